"""Routing, authentication, the small routes, and `lamina serve` (arguments, start-up, shutdown)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import logging
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote

from lamina import envs
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
def _api_key(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("must not be empty (an empty key would mean no authentication; "
                                         "leave --api-key out to serve without one)")
    return value


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The server's own flags (the engine's are added by lamina.cli)."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    g.add_argument("--api-key", default=None, type=_api_key,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default $LAMINA_API_KEY)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients may ask for (default: the --model value)")
    g.add_argument("--max-queued-requests", type=int, default=256,
                   help="sequences (a request runs one per prompt and per n) that may wait beyond --max-num-seqs "
                        "running ones; more get 429 (default 256)")
    g.add_argument("--max-connections", type=int, default=512,
                   help="open connections at once; more are answered 503 and closed (default 512)")
    g.add_argument("--timeout-keep-alive", type=float, default=15.0,
                   help="seconds an idle connection is kept open (default 15)")
    g.add_argument("--timeout-header", type=float, default=10.0,
                   help="seconds a client has to send a request's headers (default 10)")
    g.add_argument("--timeout-body", type=float, default=60.0,
                   help="seconds a client has to send a whole request body (default 60)")
    g.add_argument("--max-request-bytes", type=int, default=32 << 20,
                   help="largest request body accepted, in bytes (default 32 MiB)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM before being aborted")
    g.add_argument("--no-access-log", action="store_true", help="do not log one line per request")


def settings_from_args(args: argparse.Namespace, engine_config) -> ServerSettings:
    """ValueError for settings that cannot be served as given."""
    key = args.api_key
    if key is None:
        key = envs.api_key()
        if key is not None and not key:
            raise ValueError("LAMINA_API_KEY is set but empty; unset it to serve without an API key")
    names = args.served_model_name or [engine_config.model]
    limits = Limits(max_body_bytes=args.max_request_bytes, keep_alive_timeout=args.timeout_keep_alive,
                    header_timeout=args.timeout_header, body_timeout=getattr(args, "timeout_body", 60.0),
                    max_connections=getattr(args, "max_connections", 512))
    return ServerSettings(host=args.host, port=args.port, api_keys=(key,) if key is not None else (),
                          served_model_names=names,
                          max_inflight_seqs=engine_config.max_num_seqs + args.max_queued_requests,
                          shutdown_timeout=args.shutdown_timeout, limits=limits)


def base_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def example_snippet(url: str, model: str, with_key: bool) -> str:
    key = 'os.environ["LAMINA_API_KEY"]' if with_key else '"none"'
    return f'''import os
from openai import OpenAI
client = OpenAI(api_key={key}, base_url="{url}")  # "{url}/v1" works too
stream = client.chat.completions.create(model="{model}", stream=True, messages=[
    {{"role": "user", "content": "What is answer to the ultimate question of life, the universe, and everything? Be brief."}},
    {{"role": "assistant", "content": "42."}},
    {{"role": "user", "content": "Why was that number chosen?"}}])
for chunk in stream:
    content = chunk.choices[0].delta.content
    print(content if content is not None else "<end-of-stream>")'''


async def serve(settings: ServerSettings, engine_factory: Callable[[], object]) -> int:
    """Serve until a signal (exit code 0), or until the engine dies (1: nothing more can be served,
    so the process ends and a supervisor can restart it, rather than answer 503 for ever)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    engine_died: list[BaseException] = []

    def on_engine_death(exc: BaseException) -> None:   # on the engine's thread
        engine_died.append(exc)
        loop.call_soon_threadsafe(stop.set)

    def build_engine():
        engine = engine_factory()
        engine.on_death = on_engine_death
        return engine

    def ready(app: App) -> None:
        url = base_url(settings.host, app.port)
        print(f"lamina: ready ({app.engine.model_name}, context {app.engine.max_model_len} tokens). "
              f"Try it:\n\n{example_snippet(url, app.served_names[0], bool(settings.api_keys))}\n", flush=True)

    app = App(settings, engine_factory=build_engine, on_ready=ready)
    try:
        await app.start()
    except OSError as e:
        print(f"lamina: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    url = base_url(settings.host, app.port)
    print(f"lamina: serving {', '.join(app.served_names)} at {url} (OpenAI-compatible; the /v1 prefix is "
          f"optional). Loading the model...", flush=True)

    def on_signal() -> None:
        if stop.is_set():  # a second signal: do not wait for in-flight requests
            app.abort_all()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    waiter = asyncio.create_task(stop.wait())
    loaded = asyncio.create_task(app.loaded.wait())
    await asyncio.wait({waiter, loaded}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set() and app.load_error is None:
        await waiter
    loaded.cancel()
    waiter.cancel()
    if engine_died:
        reason = "the engine failed (see the log above); exiting so that a supervisor can restart the server"
    else:
        reason = "shutting down" if stop.is_set() else "the model failed to load"
    print(f"lamina: {reason}", file=sys.stderr, flush=True)
    await app.shutdown()
    return 1 if app.load_error is not None or engine_died else 0


def run_server(args: argparse.Namespace, engine_config) -> int:
    """Blocking: serve until SIGINT/SIGTERM; returns the process exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lamina.server.access").disabled = bool(getattr(args, "no_access_log", False))
    try:
        settings = settings_from_args(args, engine_config)
    except ValueError as e:
        print(f"lamina: {e}", file=sys.stderr)
        return 2

    def build_engine():
        from lamina.engine.async_engine import AsyncEngine
        return AsyncEngine(engine_config)

    try:
        return asyncio.run(serve(settings, build_engine))
    except KeyboardInterrupt:
        return 130
