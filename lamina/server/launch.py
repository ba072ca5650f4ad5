"""`lamina serve`: its command-line arguments, start-up messages, signals and exit code."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Callable

from lamina import envs
from lamina.server.app import App, ServerSettings
from lamina.server.http import Limits


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
