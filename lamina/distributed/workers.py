"""Rank 0's side of a tensor-parallel group: start the other ranks (or join those torchrun
started), hand them the resolved config, watch them, and stop them.

lamina starts its workers as `python -m lamina.distributed.worker` subprocesses rather than by
multiprocessing's spawn: a spawned child re-imports the caller's main module, which a script
without an `if __name__ == "__main__"` guard would run again. A worker started here finds rank 0
through the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and checks in at
rank 0's store first, so that rank 0 sees a worker that died before joining rather than wait. A worker exits when rank 0 tells it to, when its collectives fail (rank 0 is
gone), or when it sees its parent process go.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from lamina import envs
from lamina.distributed.group import ParallelContext, distributed_backend
from lamina.distributed.steps import StepChannel
from lamina.engine.errors import ParallelFailure

log = logging.getLogger("lamina.engine")

# A collective waits this long for the slowest rank: a first torch.compile of a step, which every
# rank runs at once, takes minutes on a small machine.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
WATCH_INTERVAL = 0.2            # seconds between looks at the workers
STOP_TIMEOUT = 5.0              # seconds a worker gets to exit after being told to


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """A rank's device: the GPU of its local rank, or the CPU."""
    if device.type != "cuda":
        return device
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def to_wire(config) -> dict:
    """The resolved config as the workers receive it, once at start: the backend travels by name
    (its ops are a module), rebuilt on each rank."""
    return {"config": dataclasses.replace(config, backend=None), "backend": config.backend.name}


def from_wire(wire: dict, local_rank: int):
    from lamina.kernels import get_backend
    config = wire["config"]
    device = rank_device(config.device, local_rank)
    backend = get_backend(wire["backend"], device, attention=config.kernel_plan.attention)
    return dataclasses.replace(config, device=device, backend=backend)


def join_group(rank: int, world_size: int, store: dist.Store | None = None) -> None:
    """The default group is gloo, for the one pickled exchange at start (the config). Without a
    store, torchrun's (env://)."""
    if store is None:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)


def worker_store(rank: int) -> dist.Store:
    """A worker lamina started: rank 0's store, where it checks in before joining the group."""
    addr, port = envs.master()
    store = dist.TCPStore(addr, port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    store.set(f"lamina/started/{rank}", "1")
    return store


def compute_group(device: torch.device):
    """The group of the layers' collectives and the step inputs: NCCL on CUDA, else the gloo one."""
    backend = distributed_backend(device)
    return dist.group.WORLD if backend == "gloo" else dist.new_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)


class Workers:
    """`context` and `channel` are rank 0's; `on_failure(exc)`, if set, is called (from the
    watching thread) when a worker dies while the group should be running."""

    def __init__(self, config):
        n = config.tensor_parallel_size
        self.processes: list[subprocess.Popen] = []
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        self._closing = False
        self._lock = threading.Lock()
        if envs.launched_by_torchrun():
            rank, world = envs.rank(), envs.world_size()
            if world != n or rank != 0:
                raise ValueError(f"torchrun started {world} processes (this one rank {rank}); "
                                 f"tensor_parallel_size {n} needs exactly {n}, rank 0 running the engine")
            local_rank, store = envs.local_rank(), None
        else:
            store = dist.TCPStore("127.0.0.1", 0, world_size=n, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                                  wait_for_workers=False)
            self.processes = [self._spawn(rank, n, store.port) for rank in range(1, n)]
            local_rank = 0
        try:
            if store is not None:
                self._wait_for_workers(store)
            join_group(0, n, store)
            dist.broadcast_object_list([to_wire(config)], src=0)
            self.device = rank_device(config.device, local_rank)
            group = compute_group(self.device)
        except BaseException:
            self.shutdown()
            raise
        self.context = ParallelContext(0, n, self.device, group)
        self.channel = StepChannel(group, self.device)
        self._watcher = threading.Thread(target=self._watch, name="lamina-tp-watch", daemon=True)
        self._watcher.start()
        log.info("tensor parallelism: %d ranks over %s (%s)", n, distributed_backend(self.device),
                 "started by torchrun" if not self.processes else
                 f"workers pid {', '.join(str(p.pid) for p in self.processes)}")

    @staticmethod
    def _spawn(rank: int, world_size: int, port: int) -> subprocess.Popen:
        import lamina
        root = os.path.dirname(os.path.dirname(os.path.abspath(lamina.__file__)))
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "LAMINA_TP_PARENT": str(os.getpid()),
               # the workers import the very lamina this process runs
               "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        return subprocess.Popen([sys.executable, "-m", "lamina.distributed.worker"], env=env)

    def _wait_for_workers(self, store: dist.Store) -> None:
        """Until every worker has checked in: one that exits first (a broken environment, say)
        fails the start at once, rather than leave rank 0 waiting for it."""
        keys = [f"lamina/started/{rank}" for rank in range(1, len(self.processes) + 1)]
        while not store.check(keys):
            for rank, p in enumerate(self.processes, start=1):
                if p.poll() is not None:
                    raise RuntimeError(f"tensor-parallel worker rank {rank} exited with code {p.returncode} "
                                       f"before joining (its error is in the log above)")
            time.sleep(WATCH_INTERVAL)

    # -- watching ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._closing:
            for rank, p in enumerate(self.processes, start=1):
                code = p.poll()
                if code is not None and not self._closing:
                    self._fail(ParallelFailure(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {code}"))
                    return
            time.sleep(WATCH_INTERVAL)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = exc
        log.error("%s: the engine cannot go on", exc)
        self._stop_processes()     # the others could only wait on the dead one for ever
        if self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:
                log.exception("on_failure failed")

    def check(self) -> None:
        """Raise the group's failure, if a worker has died."""
        if self.failure is not None:
            raise self.failure

    # -- stopping ----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Tell the workers to stop, wait for them, and end the ones that do not. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        told = False
        if self.failure is None and hasattr(self, "channel") and all(p.poll() is None for p in self.processes):
            # on a thread: a stop message into a broken group must not hang the caller
            sent = []
            sender = threading.Thread(target=self._send_stop, args=(sent,), daemon=True)
            sender.start()
            sender.join(STOP_TIMEOUT)
            told = bool(sent)
        self._stop_processes(grace=STOP_TIMEOUT if told else 0.0)
        if dist.is_initialized():   # this process may start another group later (a new LLM)
            try:
                dist.destroy_process_group()
            except Exception as e:
                log.warning("could not tear down the tensor-parallel group: %s", e)

    def _send_stop(self, sent: list) -> None:
        try:
            self.channel.send_stop()
            sent.append(True)
        except Exception as e:     # a worker is gone: it is stopped below
            log.warning("could not tell the tensor-parallel workers to stop: %s", e)

    def _stop_processes(self, grace: float = 0.0) -> None:
        deadline = time.monotonic() + grace
        for p in self.processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

