"""Each step's inputs, from rank 0 to the other ranks, as tensors broadcast over the group.

Two broadcasts a step, nothing pickled: a fixed-size int64 header (what comes, and its sizes), then
one int64 tensor holding every input tensor one after the other. The workers cut it back into the
step's input ids, positions and attention metadata, and run the same forward as rank 0.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lamina.kernels import AttentionMetadata

STOP, STEP = 0, 1
# command, tokens, sequences, block-table width, logits rows (-1: every row), max query len, max seq len
HEADER_SIZE = 7


class StepChannel:
    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group, self.device = group, device
        self._header = torch.zeros(HEADER_SIZE, dtype=torch.int64, device=device)

    # -- rank 0 ------------------------------------------------------------------------------------
    def send(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> None:
        logits = md.logits_indices
        header = [STEP, input_ids.shape[0], md.num_seqs, md.block_tables.shape[1],
                  -1 if logits is None else logits.shape[0], md.max_query_len, md.max_seq_len]
        self._header.copy_(torch.tensor(header, dtype=torch.int64))
        dist.broadcast(self._header, src=0, group=self.group)
        parts = [input_ids, positions, md.query_start_loc, md.seq_lens, md.block_tables.reshape(-1), md.slot_mapping]
        if logits is not None:
            parts.append(logits)
        payload = torch.cat([p.to(torch.int64) for p in parts])
        dist.broadcast(payload, src=0, group=self.group)

    def send_stop(self) -> None:
        self._header.zero_()
        dist.broadcast(self._header, src=0, group=self.group)

    # -- the other ranks ---------------------------------------------------------------------------
    def recv(self) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata] | None:
        """The next step's inputs, or None when rank 0 says stop."""
        dist.broadcast(self._header, src=0, group=self.group)
        command, tokens, seqs, width, logits, max_query_len, max_seq_len = self._header.tolist()
        if command == STOP:
            return None
        sizes = [tokens, tokens, seqs + 1, seqs, seqs * width, tokens] + ([logits] if logits >= 0 else [])
        payload = torch.empty(sum(sizes), dtype=torch.int64, device=self.device)
        dist.broadcast(payload, src=0, group=self.group)
        ids, positions, qsl, seq_lens, tables, slots, *rest = payload.split(sizes)
        md = AttentionMetadata(
            query_start_loc=qsl.to(torch.int32), seq_lens=seq_lens.to(torch.int32),
            block_tables=tables.to(torch.int32).view(seqs, width), slot_mapping=slots.clone(),
            max_query_len=max_query_len, max_seq_len=max_seq_len,
            logits_indices=rest[0].clone() if rest else None)
        return ids.clone(), positions.clone(), md
