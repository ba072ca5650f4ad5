"""Logits -> next tokens for a whole batch at once.

Every setting is a per-row tensor, so one pass of tensor ops serves a batch that mixes greedy and
random rows, penalties and none. The only per-row Python work is drawing noise for rows that carry
their own seed (so their draws do not depend on what else is in the batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lamina.sampling_params import SamplingParams, TokenLogprob


@dataclass
class SamplingBatch:
    """The sampler's view of B rows: settings as tensors, plus what penalties need."""
    temperature: torch.Tensor        # [B] float; 0 = greedy
    top_k: torch.Tensor              # [B] long; 0 = off
    top_p: torch.Tensor              # [B] float
    min_p: torch.Tensor              # [B] float
    presence_penalty: torch.Tensor   # [B]
    frequency_penalty: torch.Tensor  # [B]
    repetition_penalty: torch.Tensor  # [B]
    output_ids: list[list[int]]      # generated so far, per row
    prompt_ids: list[list[int]]
    logit_bias: list[dict[int, float] | None]
    banned: list[list[int]]          # token ids forbidden this step (EOS/stop ids before min_tokens)
    generators: list[torch.Generator | None]
    num_logprobs: list[int | None]
    allowed: torch.Tensor | None = None  # [B, V] bool: what each row's grammar allows (structured outputs)

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids, output_ids, banned, generators,
              allowed: torch.Tensor | None = None) -> "SamplingBatch":
        f = lambda name: torch.tensor([float(getattr(p, name)) for p in params])
        return cls(
            temperature=f("temperature"), top_k=torch.tensor([max(int(p.top_k), 0) for p in params]),
            top_p=f("top_p"), min_p=f("min_p"), presence_penalty=f("presence_penalty"),
            frequency_penalty=f("frequency_penalty"), repetition_penalty=f("repetition_penalty"),
            output_ids=output_ids, prompt_ids=prompt_ids, logit_bias=[p.logit_bias for p in params],
            banned=banned, generators=generators, num_logprobs=[p.logprobs for p in params], allowed=allowed)


def _padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0) or 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = True
    return ids.to(device), mask.to(device)


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over generated tokens; the CTRL-style repetition
    penalty over prompt and generated tokens (divide positive logits, multiply negative ones)."""
    device, vocab = logits.device, logits.shape[1]
    if bool((b.presence_penalty != 0).any() or (b.frequency_penalty != 0).any()):
        ids, mask = _padded(b.output_ids, device)
        counts = torch.zeros_like(logits).scatter_add_(1, ids, mask.to(logits.dtype))
        logits = logits - b.frequency_penalty.to(device)[:, None] * counts
        logits = logits - b.presence_penalty.to(device)[:, None] * (counts > 0).to(logits.dtype)
    if bool((b.repetition_penalty != 1).any()):
        ids, mask = _padded([p + o for p, o in zip(b.prompt_ids, b.output_ids)], device)
        seen = torch.zeros(logits.shape[0], vocab, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask)
        penalty = b.repetition_penalty.to(device)[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    return logits


def apply_bias_and_bans(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    rows, cols, vals = [], [], []
    for i, bias in enumerate(b.logit_bias):
        for tok, v in (bias or {}).items():
            rows.append(i); cols.append(int(tok)); vals.append(float(v))
    for i, ids in enumerate(b.banned):
        for tok in ids:
            rows.append(i); cols.append(int(tok)); vals.append(float("-inf"))
    if rows:
        logits = logits.index_put((torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
                                  torch.tensor(vals, device=logits.device, dtype=logits.dtype), accumulate=True)
    return logits


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Only what the grammar allows may be sampled: everything else to -inf."""
    return logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))


def apply_top_k_top_p_min_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p (nucleus) and min-p exclude. Expects temperature applied."""
    device = logits.device
    use_k = bool((b.top_k > 0).any())
    use_p = bool((b.top_p < 1).any())
    if use_k or use_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if use_k:
            k = b.top_k.to(device)
            k = torch.where(k > 0, k, torch.full_like(k, vocab))
            drop |= torch.arange(vocab, device=device)[None, :] >= k[:, None]
        if use_p:
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs   # probability of everything ranked higher
            drop |= mass_before >= b.top_p.to(device)[:, None]
        drop[:, 0] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if bool((b.min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = b.min_p.to(device)[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def argmax_rows(x: torch.Tensor) -> list[int] | int:
    """Each row's argmax (the first on ties, as torch's), as Python ints (one int for a 1-D x). A
    float32 CPU tensor goes through numpy, whose argmax over a vocabulary-long row is an order of
    magnitude faster than torch's CPU reduction; greedy decoding takes one per token, speculative
    decoding several."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return x.numpy().argmax(axis=-1).tolist()
    return x.argmax(dim=-1).tolist()


def is_plain_greedy(params: list[SamplingParams], banned: list[list[int]]) -> bool:
    """True when every row just takes the argmax: nothing to build per row, one op per step."""
    return all(p.greedy and not p.logit_bias and p.logprobs is None and not p.penalized
               for p in params) and not any(banned)


def processed_logits(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Penalties, logit bias, bans and grammar masks: what greedy rows take the argmax of."""
    return apply_allowed(apply_bias_and_bans(apply_penalties(logits, b), b), b.allowed)


def probabilities(processed: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """The distribution sampled rows draw from: temperature, then top-k, top-p and min-p
    (greedy rows get temperature 1; callers take their argmax instead)."""
    temperature = b.temperature.to(processed.device)
    temperature = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    return apply_top_k_top_p_min_p(processed / temperature[:, None], b).softmax(dim=-1)


def sample(logits: torch.Tensor, b: SamplingBatch) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] float32 -> (token ids, logprob records for rows that asked for them)."""
    raw = logits
    logits = processed_logits(logits, b)
    greedy = (b.temperature == 0).tolist()
    tokens = argmax_rows(logits)
    if not all(greedy):
        probs = probabilities(logits, b)
        # Gumbel-max in its exponential form: argmax(p / E) with E ~ Exp(1) samples from p
        noise = torch.empty_like(probs).exponential_()
        for i, g in enumerate(b.generators):
            if g is not None:
                noise[i] = torch.empty(probs.shape[1]).exponential_(generator=g).to(probs.device)
        sampled = argmax_rows(probs / noise)
        tokens = [t if g else s for t, s, g in zip(tokens, sampled, greedy)]
    return tokens, compute_logprobs(raw, tokens, b.num_logprobs)


def compute_logprobs(logits: torch.Tensor, tokens: list[int], num_logprobs: list[int | None]) -> list[TokenLogprob | None]:
    """Log-softmax of the model's own logits (before any sampling transform), as OpenAI reports."""
    wanted = [i for i, k in enumerate(num_logprobs) if k is not None]
    records: list[TokenLogprob | None] = [None] * len(tokens)
    if not wanted:
        return records
    logprobs = logits[wanted].log_softmax(dim=-1)
    top_n = max(num_logprobs[i] for i in wanted)
    top_vals, top_ids = logprobs.topk(max(top_n, 1), dim=-1) if top_n else (None, None)
    chosen = logprobs.gather(1, torch.tensor([tokens[i] for i in wanted], device=logits.device)[:, None])[:, 0]
    for row, i in enumerate(wanted):
        k = num_logprobs[i]
        top = []
        if k:
            top = list(zip(top_ids[row, :k].tolist(), top_vals[row, :k].tolist()))
        records[i] = TokenLogprob(tokens[i], float(chosen[row]), top)
    return records
