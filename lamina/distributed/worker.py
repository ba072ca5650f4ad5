"""A tensor-parallel rank other than 0: join the group, load this rank's shard, then run every step
rank 0 broadcasts until it says stop.

Started by lamina (`python -m lamina.distributed.worker`, see workers.py) or by torchrun, through
`lamina serve` (or any lamina command) with --tensor-parallel-size: its ranks past 0 come here.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch.distributed as dist

from lamina import envs

log = logging.getLogger("lamina.engine")


def run() -> int:
    from lamina.distributed.group import ParallelContext
    from lamina.distributed.steps import StepChannel
    from lamina.distributed.workers import compute_group, from_wire, join_group, worker_store
    from lamina.engine.model_runner import ModelRunner

    rank, world_size = envs.rank(), envs.world_size()
    # Ctrl-C reaches every process of the terminal's group: rank 0 alone decides when to stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = envs.tp_parent()
    if parent is not None:
        _exit_with_parent(parent)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")
    join_group(rank, world_size, worker_store(rank) if parent is not None else None)
    wire = [None]
    dist.broadcast_object_list(wire, src=0)
    config = from_wire(wire[0], envs.local_rank())
    group = compute_group(config.device)
    runner = ModelRunner(config, ParallelContext(rank, world_size, config.device, group))
    channel = StepChannel(group, config.device)
    while (step := channel.recv()) is not None:   # outside inference mode, as rank 0's inputs are
        runner.forward(*step)
    dist.destroy_process_group()
    return 0


def _exit_with_parent(parent: int) -> None:
    """A worker lamina started never outlives the process that started it, however that one ended."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="lamina-tp-parent", daemon=True).start()


def main() -> int:
    try:
        return run()
    except Exception:
        log.exception("tensor-parallel worker failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
