"""The block pool's prefix-cache keys: chained, collision-resistant, and still hitting."""
from __future__ import annotations

import hashlib

import numpy as np

from lamina.engine.kv_cache import BlockManager, chain_hash
from lamina.engine.sequence import Sequence
from lamina.sampling_params import SamplingParams

BS = 4


def _seq(tokens):
    return Sequence("r", 0, tokens, SamplingParams(), detokenizer=None, metrics=None)


def _compute(bm: BlockManager, seq: Sequence) -> None:
    """Admit seq and compute all its tokens, as a step would, then publish its full blocks."""
    hits = bm.match_prefix(seq)
    bm.admit(seq, hits)
    n = len(seq) - seq.num_computed_tokens
    bm.grow(seq, n)
    seq.num_computed_tokens += n
    bm.register_full_blocks(seq)


def test_keys_are_cryptographic_hashes_of_parent_and_token_ids():
    """Python's hash() of a tuple can be collided on purpose (vLLM's CVE-2025-25183): another
    request's KV blocks could then be served for a different prompt."""
    tokens = [1, 2, 3, 4]
    root = chain_hash(None, tokens)
    assert isinstance(root, bytes) and len(root) == 32
    assert root == hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).digest()
    child = chain_hash(root, [5, 6, 7, 8])
    assert child == hashlib.sha256(root + np.asarray([5, 6, 7, 8], dtype=np.int32).tobytes()).digest()
    assert chain_hash(root, [5, 6, 7, 8]) != chain_hash(None, [5, 6, 7, 8])   # the parent counts
    assert chain_hash(None, [1, 2, 3, 4]) != chain_hash(None, [1, 2, 3, 5])
    assert chain_hash(None, np.asarray(tokens)) == root                       # any int sequence


def test_identical_prefixes_still_hit():
    bm = BlockManager(num_blocks=16, block_size=BS)
    first = _seq(list(range(10)))           # two full blocks and a partial one
    _compute(bm, first)
    assert all(isinstance(h, bytes) for h in first.block_hashes) and len(first.block_hashes) == 2
    full_blocks = first.block_table[:2]
    bm.release(first)
    second = _seq(list(range(8)) + [99, 98, 97])
    assert bm.match_prefix(second) == full_blocks
    other = _seq([0, 1, 2, 9] + list(range(4, 8)) + [1])   # differs in the first block: no hit at all
    assert bm.match_prefix(other) == []
    bm.check_invariants()

