"""The block pool: which KV-cache blocks each sequence owns, reference counts, and the prefix cache.

A block is in exactly one of three states:
  in use  - ref_count > 0 (held by one or more running sequences)
  cached  - ref_count == 0 but full and hashed: its K/V can serve a later prompt with the same prefix
  free    - ref_count == 0 and holding nothing reusable
Cached blocks are evicted least-recently-used, and only once no free block is left.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from lamina.engine.sequence import Sequence


def chain_hash(parent: bytes | None, tokens) -> bytes:
    """Identity of a full block: SHA-256 of the parent block's key and this block's token ids (as
    int32 bytes), so a key names the block's tokens and everything before them. A cryptographic
    hash, because keys decide whose KV blocks a prompt is served: Python's hash() of a tuple can be
    collided on purpose, which would hand one request another's cache (vLLM's CVE-2025-25183).
    The parent key is 32 bytes, or none for a prompt's first block, so no two inputs share bytes."""
    data = np.asarray(tokens, dtype=np.int32).tobytes()
    return hashlib.sha256(parent + data if parent is not None else data).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.cached: OrderedDict[int, None] = OrderedDict()   # evictable, oldest first
        self.hash_to_block: dict[bytes, int] = {}

    # -- accounting --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached and evictable)."""
        return len(self.free) + len(self.cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def check_invariants(self) -> None:
        used = sum(1 for r in self.ref_counts if r > 0)
        assert used + len(self.cached) + len(self.free) == self.num_blocks, "blocks leaked or double-counted"
        assert all(self.ref_counts[b] == 0 for b in self.free)
        assert all(self.ref_counts[b] == 0 and self.block_hash[b] is not None for b in self.cached)

    # -- allocation --------------------------------------------------------------------------
    def _take_block(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.cached.popitem(last=False)      # evict the least recently used
            del self.hash_to_block[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.cached.pop(block, None)
        self.ref_counts[block] += 1

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of seq's tokens. At least one token is always left to
        compute, since sampling needs the last token's logits."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position's logits, so nothing is skipped
        hits, parent = [], None
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        for i in range(max_blocks):
            h = chain_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
            parent = h
        return hits

    def blocks_to_admit(self, seq: Sequence, num_new_tokens: int, hits: list[int]) -> int:
        """How many blocks admitting seq with num_new_tokens takes out of the free pool."""
        total = seq.num_blocks_needed(len(hits) * self.block_size + num_new_tokens, self.block_size)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)   # cached blocks leave the pool too
        return total - len(hits) + revived

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give seq its prefix-cache hits; computing starts after them."""
        parent = None
        for block in hits:
            self._ref(block)
            parent = self.block_hash[block]
            seq.block_hashes.append(parent)
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = seq.num_blocks_needed(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return need - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make seq's block table cover the tokens it is about to compute."""
        need = seq.num_blocks_needed(seq.num_computed_tokens + num_new_tokens, self.block_size)
        while len(seq.block_table) < need:
            seq.block_table.append(self._take_block())

    def trim(self, seq: Sequence) -> None:
        """Return the blocks past seq's computed tokens (those only rejected draft tokens used).
        They are its own and unhashed: only full blocks of computed tokens are ever hashed."""
        need = seq.num_blocks_needed(seq.num_computed_tokens, self.block_size)
        while len(seq.block_table) > need:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free.append(block)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish seq's newly completed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = chain_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h

    def release(self, seq: Sequence) -> None:
        """Drop seq's hold on its blocks; hashed ones stay reusable until evicted."""
        # release the tail first so that, among equally old blocks, a prompt's head survives longest
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is not None:
                    self.cached[block] = None
                else:
                    self.free.append(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
