"""The library API: `LLM(model).generate(prompts, params)` and friends, on top of the engine."""
from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Iterator
from dataclasses import fields

from lamina.config import DEFAULT_MODEL, EngineConfig
from lamina.engine.engine import LLMEngine
from lamina.engine.errors import RequestFailedError
from lamina.sampling_params import RequestOutput, SamplingParams
from lamina.tokenizer import Tokenizer

Prompt = str | list[int] | dict


# LLM runs whole lists of prompts for throughput, so a step may take up to this many new tokens
# (EngineConfig's 2048 keeps a server's running decodes from waiting behind a long prefill chunk;
# bench/offline.py measures the difference).
OFFLINE_MAX_NUM_BATCHED_TOKENS = 8192
# lists at least this long get a progress bar (use_tqdm=True)
PROGRESS_MIN_PROMPTS = 2


def _show_engine_log() -> None:
    """A library user who configured no logging still sees the start-up lines (model, KV cache,
    fast paths, the background compile), as vLLM shows its own: INFO of the lamina loggers on stderr."""
    lamina_log = logging.getLogger("lamina")
    if lamina_log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s lamina: %(message)s", "%H:%M:%S"))
    lamina_log.addHandler(handler)
    if lamina_log.level == logging.NOTSET:
        lamina_log.setLevel(logging.INFO)


class LLM:
    """An engine in the caller's thread. Every call runs all its prompts through the engine at
    once (continuous batching), so a list of 256 prompts costs far less than 256 calls.

        llm = LLM("smollm2-135m-instruct")
        out = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
        print(out[0].text)
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "auto", device: str | None = None,
                 **engine_options):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_options) - known
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(sorted(unknown))}")
        engine_options.setdefault("max_num_batched_tokens", OFFLINE_MAX_NUM_BATCHED_TOKENS)
        _show_engine_log()
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, **engine_options))
        self._ids = itertools.count()
        # tensor-parallel workers stop with this object, or at exit, whichever comes first
        self._finalizer = weakref.finalize(self, self.engine.shutdown)

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel workers now (the LLM cannot generate after)."""
        self._finalizer()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def wait_until_compiled(self, timeout: float | None = None) -> bool:
        """LLM(...) returns before its steps are compiled (on CPU they compile in the background and
        swap in when ready; until then steps run eagerly). Block until they are; True if compiled
        steps are in use, or the engine runs eagerly by choice (enforce_eager)."""
        return self.engine.wait_until_compiled(timeout)

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts may be strings, token-id lists, `{"prompt_token_ids": [...]}`, or a list of these.
        Returns one finished RequestOutput per prompt, in order. A request the engine failed on
        comes back with finish_reason "error" (and .error says why); the others are unaffected.
        use_tqdm: a progress bar on stderr while a list of prompts runs."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        self._check_grammars(params_list)
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.engine.add_request(f"llm-{next(self._ids)}", prompt, p))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            self.engine.step()
            raise
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) >= PROGRESS_MIN_PROMPTS:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="Processed prompts", unit="prompt", dynamic_ncols=True)
        try:
            while len(finished) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [finished[rid] for rid in ids]

    def _check_grammars(self, params_list) -> None:
        """An invalid schema, regex or grammar raises here (a RequestError, a ValueError) before
        anything runs, as any other invalid parameter does."""
        for spec in {p.structured_outputs.key: p.structured_outputs for p in params_list
                     if p is not None and p.structured_outputs is not None}.values():
            self.engine.grammars.compile(spec).result()

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self._chat_prompt(c, add_generation_prompt) for c in conversations], params,
                             use_tqdm=use_tqdm)

    def _chat_prompt(self, conversation: list[dict], add_generation_prompt: bool = True) -> dict:
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        # the template already holds every special token it wants
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False) -> Iterator[str]:
        """Yield text deltas of one request as the engine produces them. With chat=True the prompt is a
        conversation. Stopping the iteration early aborts the request."""
        if chat:
            prompt = self._chat_prompt(prompt)
        self._check_grammars([params])
        rid = self.engine.add_request(f"llm-{next(self._ids)}", prompt, params or SamplingParams())
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    if out.error is not None:
                        done = True
                        raise RequestFailedError(out.error)
                    if out.outputs[0].delta_text:
                        yield out.outputs[0].delta_text
                    done = out.finished
        finally:
            if not done:
                self.engine.abort(rid)
                self.engine.step()
