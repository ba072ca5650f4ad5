"""The engine on a background thread, with one async stream of outputs per request.

Callers on an asyncio loop submit and abort through a thread-safe queue; the step thread hands each
output back to the loop that asked for it with `call_soon_threadsafe`. Only the step thread touches
the engine's state.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from lamina.config import EngineConfig
from lamina.engine.engine import LLMEngine
from lamina.engine.errors import EngineDeadError, RequestFailedError
from lamina.sampling_params import RequestOutput, SamplingParams

log = logging.getLogger("lamina.engine")


class AsyncEngine:
    """`on_death(exc)`, if given, is called once (from the step thread) when the step loop dies:
    nothing more can be served, so a server should exit and let its supervisor restart it."""

    def __init__(self, config: EngineConfig | LLMEngine, on_death: Callable[[BaseException], None] | None = None):
        self.engine = config if isinstance(config, LLMEngine) else LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.model_config.vocab_size   # the width of the logits
        self.model_name = self.engine.config.model
        self.stats = self.engine.stats
        self.on_death = on_death
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # guards _dead and _streams together: a request registers only while the loop is alive, and
        # the loop's death fails every stream registered before it
        self._lock = threading.Lock()
        self._dead: BaseException | None = None
        self._stopping = False
        if self.engine.workers is not None:   # a tensor-parallel worker's death ends the engine, idle or not
            self.engine.workers.on_failure = self._die
        self._thread = threading.Thread(target=self._run, name="lamina-engine", daemon=True)
        self._thread.start()

    # -- caller side (any thread / event loop) -------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, prompt_param: str = "prompt") -> None:
        """The engine's checks, on the caller's thread: for a caller (the server) that must refuse a
        request before it answers anything. generate() needs no call: the engine checks each request
        it adds, and a refused one raises from the stream before any output."""
        self.engine.validate(prompt_token_ids, params.with_defaults(self.engine.generation_defaults), prompt_param)

    def compile_grammar(self, spec):
        """A future of spec's compiled grammar (thread-safe; compiled once, off the step thread)."""
        return self.engine.grammars.compile(spec)

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None,
                       prompt_text: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (each carries the deltas since the previous one). Invalid
        requests raise before the first output. Leaving the loop early aborts the request."""
        request_id = request_id or uuid.uuid4().hex
        if isinstance(prompt, list) and prompt_text is not None:
            prompt = {"prompt": prompt_text, "prompt_token_ids": prompt}
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._dead is not None or self._stopping:
                raise EngineDeadError("the engine has stopped" if self._dead is not None else "the engine is shutting down")
            self._streams[request_id] = (loop, stream)
        self._commands.put(("add", request_id, prompt, params, time.time()))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine is done with it
                    raise item
                if item.error is not None:
                    finished = True
                    raise RequestFailedError(item.error)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the step loop; requests still in flight fail with EngineDeadError."""
        with self._lock:
            self._stopping = True
        self._commands.put(("wake",))
        self._thread.join(timeout)
        self._fail_all(EngineDeadError("the engine was shut down before this request finished"))
        if self.engine.profiler.report_enabled:
            log.info("step profile (--profile-steps):\n%s", self.engine.profile_report())
        self.engine.close()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    # -- the step thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping and self._dead is None:
                self._drain_commands(block=not engine.has_unfinished_requests())
                if not engine.has_unfinished_requests():
                    continue
                outputs = engine.step()
                t0 = time.perf_counter()
                for out in outputs:
                    self._deliver(out.request_id, out)
                engine.profiler.add("stream", time.perf_counter() - t0)
        except BaseException as e:  # the engine is broken: fail every stream instead of hanging it
            log.exception("engine step loop died")
            self._die(e)

    def _die(self, exc: BaseException) -> None:
        """Once: mark the engine dead, tell on_death, fail every stream (any thread)."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = exc
        self._commands.put(("wake",))
        if self.on_death is not None:
            try:
                self.on_death(exc)
            except Exception:
                log.exception("on_death failed")
        self._fail_all(EngineDeadError("the engine failed and has stopped; the server must be restarted"))

    def _fail_all(self, error: EngineDeadError) -> None:
        with self._lock:
            streams = list(self._streams)
        for rid in streams:
            self._deliver(rid, error)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params, arrival = cmd
            if rid not in self._streams:   # the caller left before the request reached us
                return
            try:
                self.engine.add_request(rid, prompt, params, arrival_time=arrival)
            except Exception as e:  # refused (RequestError): raised from the caller's stream
                self._deliver(rid, e)
        elif kind == "abort":
            self.engine.abort(cmd[1])

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            self._commands.put(("abort", request_id))
