"""POST /chat/completions and /completions: run a validated request on the engine and answer it,
whole or as server-sent events. Everything that can be refused is checked before the first byte
of a response; later failures become a `data: {"error": ...}` event followed by `data: [DONE]`."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, replace

from lamina.engine.errors import ContextLengthExceeded, EngineDeadError, RequestError
from lamina.server import openai_api as oai
from lamina.server.errors import APIError, bad_request
from lamina.server.http import ClientGone, Exchange, Request

log = logging.getLogger("lamina.server")


@dataclass
class _Prompt:
    token_ids: list[int]
    text: str
    params: object  # SamplingParams with max_tokens resolved for this prompt


@dataclass
class _Choice:
    index: int
    prompt: int
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    offset: int = 0     # legacy logprobs: text offset of the next token


class _Aborted(Exception):
    pass


def _context_error(app, n_prompt: int, max_tokens: int | None, param: str) -> APIError:
    limit = app.engine.max_model_len
    if max_tokens is None:
        msg = (f"This model's maximum context length is {limit} tokens. However, your {param} resulted in "
               f"{n_prompt} tokens, which leaves no room for a completion. Please reduce the length of the "
               f"{param}.")
    else:
        msg = (f"This model's maximum context length is {limit} tokens. However, you requested "
               f"{n_prompt + max_tokens} tokens ({n_prompt} in the {param}, {max_tokens} in the completion). "
               f"Please reduce the length of the {param} or completion.")
    return bad_request(msg, param, "context_length_exceeded")


def _encode(tokenizer, text: str, add_special_tokens: bool, param: str) -> list[int]:
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except Exception:
        raise bad_request(f"'{param}' could not be tokenized (is it valid UTF-8 text?).", param) from None


def _prepare(app, gen: oai.GenerationRequest) -> list[_Prompt]:
    """Tokenize the prompt(s), resolve max_tokens and check that everything fits the context."""
    tok = app.engine.tokenizer
    if gen.kind == "chat":
        try:
            text = tok.apply_chat_template(gen.messages, add_generation_prompt=True)
        except Exception as e:  # ChatTemplateError: the template refused this conversation
            raise bad_request(f"The chat template could not render these messages: {e}", "messages") from None
        raw = [(text, _encode(tok, text, False, "messages"))]
        param = "messages"
    else:
        raw = [(p, _encode(tok, p, True, "prompt")) if isinstance(p, str) else (tok.decode(p), p)
               for p in gen.prompts]
        param = "prompt"
    prompts, limit = [], app.engine.max_model_len
    for text, ids in raw:
        if not ids:
            raise bad_request(f"The {param} is empty.", param)
        max_tokens = gen.params.max_tokens
        if len(ids) >= limit or (max_tokens is not None and len(ids) + max_tokens > limit):
            raise _context_error(app, len(ids), max_tokens, param)
        try:
            params = replace(gen.params, max_tokens=limit - len(ids) if max_tokens is None else max_tokens)
            app.engine.validate(ids, params)
        except ContextLengthExceeded as e:
            raise bad_request(e.message, param, "context_length_exceeded") from None
        except RequestError as e:
            raise bad_request(e.message, e.param, e.code or "invalid_value") from None
        except ValueError as e:  # SamplingParams re-validated with the resolved max_tokens
            name = str(e).split()[0]
            raise bad_request(f"Invalid value for '{name}': {e}.", name) from None
        prompts.append(_Prompt(ids, text, params))
    return prompts


async def _outputs(app, prompts: list[_Prompt], request_id: str):
    """(prompt index, RequestOutput) from the engine streams of all prompts, as they arrive.
    Closing this generator (or cancelling its consumer) aborts whatever is still running."""
    ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
    app.active_requests.update(ids)
    try:
        if len(prompts) == 1:
            p = prompts[0]
            async with contextlib.aclosing(app.engine.generate(p.token_ids, p.params, ids[0], p.text)) as g:
                async for out in g:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, p: _Prompt):
            try:
                async for out in app.engine.generate(p.token_ids, p.params, ids[i], p.text):
                    queue.put_nowait((i, out))
            except Exception as e:
                queue.put_nowait((i, e))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        try:
            running = len(tasks)
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        app.active_requests.difference_update(ids)


def _error_for(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, _Aborted):
        return APIError(503, "The request was aborted: the server is shutting down.", type="server_error",
                        headers=[("Retry-After", "1")])
    if isinstance(exc, RequestError):
        return bad_request(exc.message, exc.param, exc.code or "invalid_value")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine has stopped: {exc}", type="server_error")
    return APIError(500, f"The server had an error while processing your request: {exc}",
                    headers=[("x-should-retry", "false")])


class _Run:
    """One generation request being answered."""

    def __init__(self, app, gen: oai.GenerationRequest, prompts: list[_Prompt], ex: Exchange):
        self.app, self.gen, self.prompts, self.ex = app, gen, prompts, ex
        self.tok = app.engine.tokenizer
        chat = gen.kind == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = gen.params.n
        self.choices = [_Choice(p * self.n + i, p) for p in range(len(prompts)) for i in range(self.n)]
        self.cached = [0] * len(prompts)
        self.seen = [False] * len(prompts)
        self.t0 = time.monotonic()
        self.ttft: float | None = None
        self.top_n = gen.logprobs or 0

    # -- shapes --------------------------------------------------------------------------------
    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.gen.kind == "chat" else "text_completion",
               "created": self.created, "model": self.gen.model, "system_fingerprint": oai.SYSTEM_FINGERPRINT,
               "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    def usage(self) -> dict:
        return oai.usage(sum(len(p.token_ids) for p in self.prompts), sum(c.num_tokens for c in self.choices),
                         sum(self.cached))

    def _echo(self, c: _Choice, out) -> tuple[str, dict | None]:
        """Completions with echo: the prompt's text (and logprobs) that open a choice."""
        p = self.prompts[c.prompt]
        lp = None
        if self.gen.logprobs is not None:
            entries = out.prompt_logprobs or [None] * len(p.token_ids)
            lp, c.offset = oai.completion_logprobs(self.tok, entries, p.token_ids, self.top_n, 0)
        return p.text, lp

    def _delta_logprobs(self, c: _Choice, o) -> dict | None:
        if self.gen.logprobs is None or not o.delta_logprobs:
            return None
        if self.gen.kind == "chat":
            return oai.chat_logprobs(self.tok, o.delta_logprobs, self.top_n)
        lp, c.offset = oai.completion_logprobs(self.tok, o.delta_logprobs,
                                               [e.token_id for e in o.delta_logprobs], self.top_n, c.offset)
        return lp

    # -- the engine loop -----------------------------------------------------------------------
    async def events(self):
        """Yields lists of choice dicts (stream shape) as outputs arrive; fills self.choices."""
        async with contextlib.aclosing(_outputs(self.app, self.prompts, self.id)) as outs:
            async for p, out in outs:
                self.cached[p] = out.num_cached_tokens
                batch = []
                if not self.seen[p]:
                    self.seen[p] = True
                    if self.gen.echo:
                        for c in self.choices[p * self.n:(p + 1) * self.n]:
                            text, lp = self._echo(c, out)
                            c.text = text
                            batch.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": None})
                for o in out.outputs:
                    c = self.choices[p * self.n + o.index]
                    if c.finish_reason is not None:
                        continue
                    c.num_tokens = len(o.token_ids)
                    if o.delta_token_ids and self.ttft is None:
                        self.ttft = time.monotonic() - self.t0
                    if o.delta_text or o.delta_logprobs:
                        c.text += o.delta_text
                        lp = self._delta_logprobs(c, o)
                        if self.gen.kind == "chat":
                            batch.append({"index": c.index, "delta": {"content": o.delta_text}, "logprobs": lp,
                                          "finish_reason": None})
                        else:
                            batch.append({"index": c.index, "text": o.delta_text, "logprobs": lp,
                                          "finish_reason": None})
                    if o.finish_reason is not None:
                        if o.finish_reason == "abort":
                            raise _Aborted()
                        c.finish_reason = o.finish_reason
                        if self.gen.kind == "chat":
                            batch.append({"index": c.index, "delta": {}, "logprobs": None,
                                          "finish_reason": c.finish_reason})
                        else:
                            batch.append({"index": c.index, "text": "", "logprobs": None,
                                          "finish_reason": c.finish_reason})
                if batch:
                    yield batch

    async def stream(self) -> None:
        ex = self.ex
        await ex.start_stream(headers=[("x-request-id", self.id)])
        if self.gen.kind == "chat":
            for c in self.choices:
                await ex.write(oai.sse(self.chunk([{"index": c.index,
                                                    "delta": {"role": "assistant", "content": "", "refusal": None},
                                                    "logprobs": None, "finish_reason": None}])))
        try:
            async for batch in self.events():
                # one event per choice update keeps each chunk's `choices` to a single entry
                await ex.write(b"".join(oai.sse(self.chunk([item])) for item in batch))
            if self.gen.include_usage:
                await ex.write(oai.sse(self.chunk([], usage=self.usage())))
        except (ClientGone, asyncio.CancelledError):
            raise
        except Exception as e:  # too late for a status code: report it in the stream
            err = _error_for(e)
            if err.status >= 500 and not isinstance(e, (_Aborted, EngineDeadError)):
                log.error("request %s failed while streaming", self.id, exc_info=e)
            await ex.write(oai.sse(err.to_dict()))
        await ex.write(oai.SSE_DONE)
        await ex.end_stream()

    async def whole(self) -> None:
        want_lp = self.gen.logprobs is not None
        chat = self.gen.kind == "chat"
        empty = (lambda: {"content": [], "refusal": None}) if chat else (
            lambda: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
        logprobs = {c.index: empty() for c in self.choices} if want_lp else {}
        async for batch in self.events():
            for item in batch:
                if item["logprobs"]:
                    for key, values in logprobs[item["index"]].items():
                        if isinstance(values, list):
                            values.extend(item["logprobs"][key])
        if chat:
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": logprobs.get(c.index), "finish_reason": c.finish_reason} for c in self.choices]
        else:
            choices = [{"index": c.index, "text": c.text, "logprobs": logprobs.get(c.index),
                        "finish_reason": c.finish_reason} for c in self.choices]
        await self.ex.send_json(200, {"id": self.id, "object": "chat.completion" if chat else "text_completion",
                                      "created": self.created, "model": self.gen.model,
                                      "system_fingerprint": oai.SYSTEM_FINGERPRINT, "choices": choices,
                                      "usage": self.usage()},
                                headers=[("x-request-id", self.id)])


async def handle_generation(app, req: Request, ex: Exchange, kind: str) -> None:
    body = oai.load_json(req.body)
    vocab = app.engine.tokenizer.vocab_size
    parse = oai.parse_chat if kind == "chat" else oai.parse_completion
    gen = parse(body, app.served_names, vocab)
    if len(req.body) > 64 << 10:  # tokenizing a long prompt takes a while: keep the event loop free
        prompts = await asyncio.get_running_loop().run_in_executor(None, _prepare, app, gen)
    else:
        prompts = _prepare(app, gen)
    with app.admit(len(prompts)):
        run = _Run(app, gen, prompts, ex)
        try:
            if gen.stream:
                await run.stream()
            else:
                try:
                    await run.whole()
                except ClientGone:
                    raise
                except Exception as e:
                    err = _error_for(e)
                    if err.status >= 500 and not isinstance(e, (_Aborted, EngineDeadError)):
                        log.error("request %s failed", run.id, exc_info=e)
                    raise err from None
        finally:
            usage = run.usage()
            ttft = f"{run.ttft:.3f}s" if run.ttft is not None else "-"
            ex.log_extra += (f" {run.id} prompt={usage['prompt_tokens']} completion={usage['completion_tokens']}"
                             f" cached={usage['prompt_tokens_details']['cached_tokens']} ttft={ttft}")
