"""Real servers on free loopback ports, all on one background event loop and one real engine
(the default model, small context and KV cache). Tests talk to them over sockets or the openai client."""
from __future__ import annotations

import asyncio
import threading

import pytest

from lamina.config import EngineConfig
from lamina.server.app import App, ServerSettings
from lamina.server.http import Limits
from tests.server.helpers import MODEL

MAX_MODEL_LEN = 512  # small: a rambling sample (the example has no max_tokens) stays short


class LoopThread:
    """An asyncio loop running forever on a daemon thread; `run` executes a coroutine on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Running:
    def __init__(self, loop: LoopThread, app: App):
        self.loop, self.app = loop, app
        self.port = app.port
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 5.0):
        self.loop.run(self.app.shutdown(timeout, stop_engine=False))


def start_app(loop: LoopThread, engine=None, engine_factory=None, **settings) -> Running:
    settings.setdefault("port", 0)
    settings.setdefault("served_model_names", [MODEL])

    async def go():
        app = App(ServerSettings(**settings), engine=engine, engine_factory=engine_factory)
        await app.start()
        return app
    return Running(loop, loop.run(go()))


@pytest.fixture(scope="session")
def server_loop():
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def engine(default_model_dir):
    from lamina.engine.async_engine import AsyncEngine
    eng = AsyncEngine(EngineConfig(model=default_model_dir, max_model_len=MAX_MODEL_LEN,
                                   kv_cache_memory=256 << 20, max_num_seqs=64))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def server(server_loop, engine) -> Running:
    """The main server: default limits, two served names, no API key."""
    srv = start_app(server_loop, engine, served_model_names=[MODEL, "lamina-alias"])
    yield srv
    srv.stop()


@pytest.fixture
def make_server(server_loop, engine):
    """Start extra servers on the shared engine with other settings (keys, limits, timeouts)."""
    started = []

    def make(**settings) -> Running:
        if "limits" in settings and isinstance(settings["limits"], dict):
            settings["limits"] = Limits(**settings["limits"])
        srv = start_app(server_loop, settings.pop("engine", engine), **settings)
        started.append(srv)
        return srv
    yield make
    for srv in started:
        if not srv.app.http.draining:
            srv.stop()
