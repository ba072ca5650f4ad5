"""The server as an object: routing, authentication and the small routes (`lamina serve`'s
arguments and start-up are in launch.py)."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote

from lamina.engine.errors import RequestError
from lamina.server import openai_api as oai
from lamina.server import prometheus
from lamina.server.errors import APIError, bad_request, from_request_error
from lamina.server.generate import decode_ids, encode_text, handle_generation, render_chat
from lamina.server.http import Exchange, HttpServer, Limits, Request

log = logging.getLogger("lamina.server")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model name
    # sequences (prompts x n, summed over requests) admitted at once, running + queued; more get 429,
    # and a single request asking for more than this gets 400
    max_inflight_seqs: int = 512
    shutdown_timeout: float = 30.0
    limits: Limits = field(default_factory=Limits)


# path without the /v1 prefix -> {method: handler name}
_ROUTES = {
    "/chat/completions": {"POST": "chat"},
    "/completions": {"POST": "completions"},
    "/models": {"GET": "models"},
    "/health": {"GET": "health"},
    "/metrics": {"GET": "metrics"},
    "/tokenize": {"POST": "tokenize"},
    "/detokenize": {"POST": "detokenize"},
}
_PUBLIC = {"/health"}
_NEEDS_ENGINE = {"chat", "completions", "models", "model", "tokenize", "detokenize"}


def _route_path(path: str) -> str:
    if path == "/v1" or path.startswith("/v1/"):
        path = path[3:] or "/"
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/") or "/"
    return path


class App:
    """The OpenAI-compatible application over one engine. The engine is given, or built by
    `engine_factory` on a worker thread after the port is open (so /health says 503 meanwhile)."""

    def __init__(self, settings: ServerSettings, engine=None, engine_factory: Callable[[], object] | None = None,
                 on_ready: Callable[["App"], None] | None = None):
        self.settings = settings
        self.engine = engine
        self.engine_factory = engine_factory
        self.on_ready = on_ready
        self.load_error: BaseException | None = None
        self.loaded = asyncio.Event()    # set when loading ended, well or not
        self.http = HttpServer(self.handle, settings.limits, check_head=self.check_head)
        self.inflight = 0   # sequences admitted (see ServerSettings.max_inflight_seqs)
        self.active_requests: set[str] = set()
        self.created = int(time.time())
        if any(not isinstance(k, str) or not k for k in settings.api_keys):
            raise ValueError("an API key must be a non-empty string")
        self._keys = [k.encode("utf-8") for k in settings.api_keys]
        self._load_task: asyncio.Task | None = None
        # CPU-heavy request work (JSON, chat templates, tokenizing, encoding big responses) runs here,
        # never on the event loop, so /health and streams keep flowing meanwhile
        self._cpu = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lamina-http")

    # -- life cycle ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine is not None and getattr(self.engine, "is_alive", True)

    @property
    def served_names(self) -> list[str]:
        if self.settings.served_model_names:
            return list(self.settings.served_model_names)
        return [getattr(self.engine, "model_name", None) or "default"]

    @property
    def port(self) -> int:
        return self.http.port

    async def start(self) -> None:
        """Open the port, then load the engine in the background if it was not given."""
        await self.http.start(self.settings.host, self.settings.port)
        if self.engine is None:
            self._load_task = asyncio.create_task(self._load())
        else:
            self.loaded.set()

    async def run_cpu(self, fn, *args):
        """Run fn(*args) on the request worker threads and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, functools.partial(fn, *args))

    async def _load(self) -> None:
        try:
            engine = await asyncio.get_running_loop().run_in_executor(None, self.engine_factory)
        except BaseException as e:  # noqa: BLE001 - reported by whoever waits on `loaded`
            self.load_error = e
            log.error("loading the model failed", exc_info=e)
        else:
            self.engine = engine
            if self.on_ready is not None:
                self.on_ready(self)
        finally:
            self.loaded.set()

    async def shutdown(self, timeout: float | None = None, stop_engine: bool = True) -> None:
        """Stop accepting, let in-flight requests finish within `timeout`, then abort the rest."""
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        await self.http.shutdown(timeout, on_deadline=self.abort_all)
        if self._load_task is not None:
            await self._load_task  # a model still loading cannot be interrupted; let it finish
        if stop_engine and self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)
        self._cpu.shutdown(wait=False)

    def abort_all(self) -> None:
        if self.engine is None:
            return
        for request_id in list(self.active_requests):
            self.engine.abort(request_id)

    @contextlib.contextmanager
    def admit(self, num_prompts: int, n: int = 1):
        """Bound the sequences held at once (each prompt runs n of them): a request that could never
        fit gets 400, one that does not fit now 429 with Retry-After."""
        count, limit = num_prompts * n, self.settings.max_inflight_seqs
        if count > limit:
            what = f"{num_prompts} prompt{'s' if num_prompts != 1 else ''} x n={n}"
            raise bad_request(f"This request asks for {count} sequences ({what}), more than this server holds at "
                              f"once ({limit}). Send fewer prompts or a smaller 'n'.", "n" if n > 1 else "prompt")
        if self.inflight + count > limit:
            raise APIError(429, "The server is busy: too many requests are queued. Please retry shortly.",
                           code="rate_limit_exceeded", headers=[("Retry-After", "1")])
        self.inflight += count
        try:
            yield
        finally:
            self.inflight -= count

    # -- routing -------------------------------------------------------------------------------
    def check_head(self, req: Request) -> None:
        """Runs on each request's head, before its body is read or 100 Continue sent."""
        if self._keys and _route_path(req.path) not in _PUBLIC:
            self._check_auth(req)

    def _check_auth(self, req: Request) -> None:
        header = req.header("authorization") or ""
        scheme, _, token = header.partition(" ")
        # header values are the raw bytes read as latin-1: back to those bytes, compared with the
        # key's UTF-8 bytes, so a non-ASCII key works as its client sends it
        given = token.strip(" \t").encode("latin-1") if scheme.lower() == "bearer" else b""
        ok = False
        for key in self._keys:  # compare against every key, so timing says nothing about which
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers=[("WWW-Authenticate", "Bearer")])

    async def handle(self, req: Request, ex: Exchange) -> None:
        try:
            await self._route(req, ex)
        except RequestError as e:
            raise from_request_error(e) from None

    async def _route(self, req: Request, ex: Exchange) -> None:
        path = _route_path(req.path)
        model_id = None
        if path.startswith("/models/"):
            routes, model_id = {"GET": "model"}, unquote(path[len("/models/"):])
        else:
            routes = _ROUTES.get(path)
        if routes is None:
            raise APIError(404, f"Not found: {req.method} {req.path}", code="not_found")
        method = "GET" if req.method == "HEAD" else req.method
        name = routes.get(method)
        if name is None:
            allowed = ", ".join(sorted(set(routes) | ({"HEAD"} if "GET" in routes else set())))
            raise APIError(405, f"Method {req.method} is not allowed on {req.path}; use {allowed}.",
                           code="method_not_allowed", headers=[("Allow", allowed)])
        if name in _NEEDS_ENGINE and not self.ready:
            raise self._unavailable()
        if name in ("chat", "completions"):
            await handle_generation(self, req, ex, "chat" if name == "chat" else "completion")
        elif name == "model":
            await self._model(ex, model_id)
        else:
            await getattr(self, "_" + name)(req, ex)

    def _unavailable(self) -> APIError:
        # why is in the server's log, not in the answer: exception text can hold paths
        if self.engine is not None:
            return APIError(503, "The engine has stopped; restart the server.", type="unavailable_error", code=503)
        if self.load_error is not None:
            return APIError(503, "The model failed to load; see the server log.", type="unavailable_error",
                            code=503)
        return APIError(503, "Loading model", type="unavailable_error", code=503, headers=[("Retry-After", "5")])

    # -- small routes --------------------------------------------------------------------------
    async def _health(self, req: Request, ex: Exchange) -> None:
        if not self.ready or self.http.draining:
            err = self._unavailable() if not self.ready else APIError(503, "Shutting down", type="unavailable_error",
                                                                     code=503)
            await ex.send_error(err)
            return
        await ex.send_json(200, {"status": "ok"})

    async def _metrics(self, req: Request, ex: Exchange) -> None:
        stats = getattr(self.engine, "stats", None)
        text = prometheus.render(stats, self.served_names[0])
        await ex.send(200, text.encode(), content_type=prometheus.CONTENT_TYPE)

    def _model_card(self, name: str) -> dict:
        # root names the base model as served (never engine.model_name: that can be a filesystem path)
        return {"id": name, "object": "model", "created": self.created, "owned_by": "lamina",
                "root": self.served_names[0], "max_model_len": self.engine.max_model_len}

    async def _models(self, req: Request, ex: Exchange) -> None:
        await ex.send_json(200, {"object": "list", "data": [self._model_card(n) for n in self.served_names]})

    async def _model(self, ex: Exchange, model_id: str) -> None:
        if model_id not in self.served_names:
            raise APIError(404, f"The model `{model_id}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        await ex.send_json(200, self._model_card(model_id))

    async def _tokenize(self, req: Request, ex: Exchange) -> None:
        await ex.send(200, await self.run_cpu(self._tokenize_body, req.body))

    def _tokenize_body(self, raw: bytes) -> bytes:
        """/tokenize's answer; on a worker thread (an 8 MiB prompt takes seconds to tokenize)."""
        body = oai.load_json(raw)
        oai.resolve_model(body, self.served_names)
        tok = self.engine.tokenizer
        if body.get("messages") is not None:
            messages = oai.parse_messages(body["messages"])
            add_gen = body.get("add_generation_prompt", True)
            text = render_chat(tok, messages, add_generation_prompt=bool(add_gen))
            add_special = body.get("add_special_tokens", False)
            param = "messages"
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise bad_request("Missing required parameter: 'prompt' (a string) or 'messages'.", "prompt",
                                  "missing_required_parameter")
            add_special = body.get("add_special_tokens", True)
            param = "prompt"
        if not isinstance(add_special, bool):
            raise bad_request("Invalid type for 'add_special_tokens': expected a boolean.", "add_special_tokens",
                              "invalid_type")
        ids = encode_text(tok, text, add_special, param)
        out = {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}
        if body.get("return_token_strs"):
            out["token_strs"] = [tok.token_text(t) for t in ids]
        return oai.dumps(out)

    async def _detokenize(self, req: Request, ex: Exchange) -> None:
        await ex.send(200, await self.run_cpu(self._detokenize_body, req.body))

    def _detokenize_body(self, raw: bytes) -> bytes:
        body = oai.load_json(raw)
        oai.resolve_model(body, self.served_names)
        if body.get("tokens") is None:
            raise bad_request("Missing required parameter: 'tokens'.", "tokens", "missing_required_parameter")
        tokens = oai.int_list(body["tokens"], "tokens", self.engine.tokenizer.vocab_size)
        return oai.dumps({"prompt": decode_ids(self.engine.tokenizer, tokens)})


# -- `lamina serve` --------------------------------------------------------------------------------
