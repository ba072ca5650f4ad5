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

from lamina.engine.errors import EngineDeadError, RequestError, RequestFailedError
from lamina.server import openai_api as oai
from lamina.server import tools
from lamina.server.errors import APIError, bad_request, from_request_error, internal_error
from lamina.server.http import ClientGone, Exchange, Request
from lamina.tokenizer import ChatTemplateError

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
    calls: tools.CallParser | None = None   # chat with tools: splits the reply into content and calls


class _Aborted(Exception):
    pass


def logits_width(engine) -> int:
    """How many token ids the model has logits for (the model config's vocab_size): the bound of
    the ids that logit_bias and stop_token_ids may name. It can differ from the tokenizer's
    vocabulary, and an id past it would index out of the sampler's tensors."""
    return engine.vocab_size


def encode_text(tok, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
    """Tokenized on a worker thread: lamina's Tokenizer lets the event loop run meanwhile."""
    try:
        return tok.encode(text, add_special_tokens=add_special_tokens)
    except Exception:
        raise bad_request(f"'{param}' could not be tokenized (is it valid UTF-8 text?).", param) from None


def decode_ids(tok, ids: list[int], skip_special_tokens: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip_special_tokens)


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = True,
                tool_use: tools.ToolUse | None = None) -> str:
    """The chat template's text, tools included. A template's own refusal (ChatTemplateError: roles
    that do not alternate, a missing template) is the client's to fix: a 400 with its message.
    Anything else is our bug: it propagates to a 500 that says nothing of it."""
    native, call_format = tools.template_format(tok.chat_template)
    messages = tools.template_messages(messages, tool_use, native, call_format)
    kwargs = {}
    if native and tool_use is not None and tool_use.choice != "none":
        kwargs["tools"] = [t.as_openai() for t in tool_use.tools]
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except ChatTemplateError as e:
        raise bad_request(f"The chat template could not render these messages: {e}", "messages") from None


def parse_request(app, kind: str, body: bytes) -> tuple[oai.GenerationRequest, list[_Prompt]]:
    """Everything a generation request needs before the engine sees it: parse and validate the
    JSON, render the chat template, tokenize, resolve max_tokens, check the context. CPU-heavy
    for long prompts, so it runs on a worker thread. Raises APIError or RequestError."""
    obj = oai.load_json(body)
    width = logits_width(app.engine)
    if kind == "chat":
        gen = oai.parse_chat(obj, app.served_names, width, tools.template_format(app.engine.tokenizer.chat_template)[1])
    else:
        gen = oai.parse_completion(obj, app.served_names, width, min(width, app.engine.tokenizer.vocab_size))
    return gen, _prepare(app, gen)


def _prepare(app, gen: oai.GenerationRequest) -> list[_Prompt]:
    """Tokenize the prompt(s), resolve max_tokens, check that everything fits the context, and
    compile the output's grammar (a 400 if it is invalid; then the engine finds it compiled)."""
    tok = app.engine.tokenizer
    if gen.params.structured_outputs is not None:
        try:
            app.engine.compile_grammar(gen.params.structured_outputs).result()
        except RequestError as e:
            raise RequestError(e.message, param=gen.grammar_param or e.param, code=e.code) from None
    if gen.kind == "chat":
        text = render_chat(tok, gen.messages, tool_use=gen.tool_use)
        raw = [(text, encode_text(tok, text, False, "messages"))]
        param = "messages"
    else:
        raw = [(p, encode_text(tok, p, True, "prompt")) if isinstance(p, str) else (decode_ids(tok, p), p)
               for p in gen.prompts]
        param = "prompt"
    prompts, limit = [], app.engine.max_model_len
    for text, ids in raw:
        # the engine's rules (empty prompt, token ids, context length), named as the client sent
        # the prompt; a RequestError becomes the 400 in one place. Checked with max_tokens as asked
        # (None: only the prompt must leave room) before it is resolved to what is left.
        app.engine.validate(ids, gen.params, param)
        max_tokens = gen.params.max_tokens
        params = replace(gen.params, max_tokens=limit - len(ids) if max_tokens is None else max_tokens)
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
    """What the client is told. Exception text stays in the server's log: a 500 or 503 says
    nothing of paths, tensors or code."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, _Aborted):
        return APIError(503, "The request was aborted: the server is shutting down.", type="server_error",
                        headers=[("Retry-After", "1")])
    if isinstance(exc, RequestError):
        return from_request_error(exc)
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine has stopped and cannot serve requests; the server needs a restart.",
                        type="server_error")
    if isinstance(exc, RequestFailedError):  # its message is written for clients (the cause is logged)
        return APIError(500, str(exc), headers=[("x-should-retry", "false")])
    return internal_error()


def _log_failure(request_id: str, exc: BaseException, streaming: bool) -> None:
    if isinstance(exc, (_Aborted, APIError, RequestError)):
        return
    where = " while streaming" if streaming else ""
    if isinstance(exc, (EngineDeadError, RequestFailedError)):   # the engine has logged the cause
        log.error("request %s failed%s: %s", request_id, where, exc)
    else:
        log.error("request %s failed%s", request_id, where, exc_info=exc)


class _Run:
    """One generation request being answered."""

    def __init__(self, app, gen: oai.GenerationRequest, prompts: list[_Prompt], ex: Exchange):
        self.app, self.gen, self.prompts, self.ex = app, gen, prompts, ex
        self.tok = app.engine.tokenizer
        chat = gen.kind == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = gen.params.n
        use = gen.tool_use
        self.choices = [_Choice(p * self.n + i, p, calls=tools.CallParser(use.format)
                                if use is not None and use.parses_calls else None)
                        for p in range(len(prompts)) for i in range(self.n)]
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
                    if o.delta_text or o.delta_logprobs or (c.calls is not None and o.finish_reason is not None):
                        lp = self._delta_logprobs(c, o)
                        if self.gen.kind == "chat":
                            content, calls = o.delta_text, []
                            if c.calls is not None:
                                content, calls = c.calls.feed(o.delta_text, final=o.finish_reason is not None)
                            c.text += content
                            if content or (lp and not calls):
                                batch.append({"index": c.index, "delta": {"content": content}, "logprobs": lp,
                                              "finish_reason": None})
                                lp = None
                            if calls:
                                batch.append({"index": c.index, "delta": {"tool_calls": calls}, "logprobs": lp,
                                              "finish_reason": None})
                        else:
                            c.text += o.delta_text
                            batch.append({"index": c.index, "text": o.delta_text, "logprobs": lp,
                                          "finish_reason": None})
                    if o.finish_reason is not None:
                        if o.finish_reason == "abort":
                            raise _Aborted()
                        c.finish_reason = o.finish_reason
                        if c.calls is not None and c.calls.calls and o.finish_reason == "stop":
                            c.finish_reason = "tool_calls"
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
            _log_failure(self.id, e, streaming=True)
            await ex.write(oai.sse(_error_for(e).to_dict()))
        await ex.write(oai.SSE_DONE)
        await ex.end_stream()

    @staticmethod
    def _message(c: _Choice) -> dict:
        if c.calls is None or not c.calls.calls:
            return {"role": "assistant", "content": c.text, "refusal": None}
        return {"role": "assistant", "content": c.text.strip() or None, "refusal": None,
                "tool_calls": [call.as_openai() for call in c.calls.calls]}

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
            choices = [{"index": c.index, "message": self._message(c), "logprobs": logprobs.get(c.index),
                        "finish_reason": c.finish_reason} for c in self.choices]
        else:
            choices = [{"index": c.index, "text": c.text, "logprobs": logprobs.get(c.index),
                        "finish_reason": c.finish_reason} for c in self.choices]
        body = {"id": self.id, "object": "chat.completion" if chat else "text_completion", "created": self.created,
                "model": self.gen.model, "system_fingerprint": oai.SYSTEM_FINGERPRINT, "choices": choices,
                "usage": self.usage()}
        # n x logprobs can make megabytes of JSON: encoded on a worker thread, in pieces
        await self.ex.send(200, await self.app.run_cpu(oai.dumps, body), headers=[("x-request-id", self.id)])


async def handle_generation(app, req: Request, ex: Exchange, kind: str) -> None:
    gen, prompts = await app.run_cpu(parse_request, app, kind, req.body)
    with app.admit(len(prompts), gen.params.n):
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
                    _log_failure(run.id, e, streaming=False)
                    raise _error_for(e) from None
        finally:
            usage = run.usage()
            ttft = f"{run.ttft:.3f}s" if run.ttft is not None else "-"
            ex.log_extra += (f" {run.id} prompt={usage['prompt_tokens']} completion={usage['completion_tokens']}"
                             f" cached={usage['prompt_tokens_details']['cached_tokens']} ttft={ttft}")
