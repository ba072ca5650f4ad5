"""Tensor parallelism: one model split over N processes that run every forward in lockstep.

    sharding.Shard        which part of each weight, head and vocabulary row a rank holds (arithmetic only)
    group.ParallelContext a rank's place in the process group, and the collectives the layers call
    steps.StepChannel     rank 0 -> workers: each step's input tensors, broadcast over the group
    workers.Workers       rank 0's side: starts (or joins) the other ranks, watches them, stops them
    worker                the other ranks' main loop (`python -m lamina.distributed.worker`, or torchrun)

Rank 0 owns the scheduler, the sampler and the server; every rank owns its shard of the weights and
of the KV cache. The parallel layers themselves are in lamina/layers/parallel.py.
"""
