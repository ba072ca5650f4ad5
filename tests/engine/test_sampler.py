"""The vectorized sampler against a plain, one-row-at-a-time reference."""
import math

import torch

from lamina.engine import sampler
from lamina.sampling_params import SamplingParams

V = 50


def make_batch(params, prompts, outputs, banned=None):
    params = [p.with_defaults({}) for p in params]
    return sampler.SamplingBatch.build(params, prompts, outputs, banned or [[] for _ in params],
                                       [None] * len(params))


def ref_penalties(row, p: SamplingParams, prompt, output):
    row = row.clone()
    for tok in set(output):
        row[tok] -= p.frequency_penalty * output.count(tok) + p.presence_penalty
    for tok in set(prompt) | set(output):
        row[tok] = row[tok] / p.repetition_penalty if row[tok] > 0 else row[tok] * p.repetition_penalty
    for tok, bias in (p.logit_bias or {}).items():
        row[tok] += bias
    return row


def ref_filters(row, p: SamplingParams):
    """top-k, then top-p over what is left, then min-p: the kept set, computed by brute force."""
    order = sorted(range(V), key=lambda i: -row[i].item())
    keep = order[:p.top_k] if p.top_k > 0 else order
    probs = torch.softmax(row[keep], 0).tolist()
    kept, mass = [], 0.0
    for tok, pr in zip(keep, probs):
        if mass >= p.top_p and kept:
            break
        kept.append(tok)
        mass += pr
    full = torch.softmax(row, 0)
    if p.min_p > 0:
        masked = torch.full_like(row, -math.inf)
        masked[kept] = row[kept]
        probs = torch.softmax(masked, 0)
        kept = [t for t in kept if probs[t] >= p.min_p * probs.max()]
    return set(kept), full


def test_penalties_and_bias_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(repetition_penalty=1.3, logit_bias={3: 5.0, 7: -100.0}),
              SamplingParams(),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5, repetition_penalty=0.8)]
    prompts = [[1, 2, 3], [4, 5, 5, 6], [7], [8, 9, 9, 10]]
    outputs = [[11, 11, 12], [4, 13, 13, 13], [], [9, 9, 20]]
    b = make_batch(params, prompts, outputs)
    got = sampler.apply_bias_and_bans(sampler.apply_penalties(logits, b), b)
    for i, p in enumerate(params):
        want = ref_penalties(logits[i], p.with_defaults({}), prompts[i], outputs[i])
        assert torch.allclose(got[i], want, atol=1e-5), i


def test_top_k_top_p_min_p_match_reference():
    torch.manual_seed(1)
    logits = torch.randn(5, V) * 2
    params = [SamplingParams(top_k=5), SamplingParams(top_p=0.6), SamplingParams(top_k=10, top_p=0.5),
              SamplingParams(min_p=0.2), SamplingParams(top_p=0.9, min_p=0.1)]
    b = make_batch(params, [[]] * 5, [[]] * 5)
    got = sampler.apply_top_k_top_p_min_p(logits.clone(), b)
    for i, p in enumerate(params):
        kept, _ = ref_filters(logits[i], p.with_defaults({}))
        assert {t for t in range(V) if got[i, t] > -math.inf} == kept, i


def test_greedy_is_argmax_and_bans_apply():
    torch.manual_seed(2)
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0)] * 3
    top = logits.argmax(-1).tolist()
    b = make_batch(params, [[]] * 3, [[]] * 3, banned=[[], [top[1]], []])
    tokens, _ = sampler.sample(logits, b)
    assert tokens[0] == top[0] and tokens[2] == top[2]
    assert tokens[1] != top[1]


def test_argmax_rows_matches_torch_including_ties():
    """The numpy path takes the first maximum, as torch.argmax does, row by row and on one row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (16, 49152), generator=g).float()   # many ties per row
    x[3, 100] = x[3, 7] = 9.0                                   # the first of two maxima
    x[5] = float("-inf")
    x[5, 49151] = 0.0
    with torch.inference_mode():
        y = x.clone()
        assert sampler.argmax_rows(y) == y.argmax(dim=-1).tolist()
        assert sampler.argmax_rows(y)[3] == 7 and sampler.argmax_rows(y)[5] == 49151
        assert sampler.argmax_rows(y[3]) == 7
        assert sampler.argmax_rows(y[1:4] / 2) == (y[1:4] / 2).argmax(dim=-1).tolist()
        assert sampler.argmax_rows(y.bfloat16()) == y.bfloat16().argmax(dim=-1).tolist()


def test_sampling_follows_distribution_and_respects_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-50.0] * (V - 4)]).repeat(4000, 1)
    params = [SamplingParams(temperature=1.0)] * 4000
    tokens, _ = sampler.sample(logits, make_batch(params, [[]] * 4000, [[]] * 4000))
    freq = torch.bincount(torch.tensor(tokens), minlength=V)[:4].float() / 4000
    expect = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), 0)
    assert torch.allclose(freq, expect, atol=0.03)
    params = [SamplingParams(temperature=1.0, top_k=2)] * 4000
    tokens, _ = sampler.sample(logits, make_batch(params, [[]] * 4000, [[]] * 4000))
    assert set(tokens) <= {0, 1}


def test_seeded_rows_do_not_depend_on_batch():
    torch.manual_seed(3)
    row = torch.randn(1, V)
    def draw(batch_rows, seed_row):
        logits = torch.cat([torch.randn(batch_rows, V), row]) if batch_rows else row
        params = [SamplingParams(temperature=1.0)] * batch_rows + [SamplingParams(temperature=1.0, seed=5)]
        b = make_batch(params, [[]] * len(params), [[]] * len(params))
        b.generators = [None] * batch_rows + [torch.Generator().manual_seed(seed_row)]
        return sampler.sample(logits, b)[0][-1]
    assert [draw(0, 5) for _ in range(3)] == [draw(7, 5) for _ in range(3)]


def test_logprobs_are_log_softmax_of_raw_logits():
    torch.manual_seed(4)
    logits = torch.randn(2, V)
    params = [SamplingParams(temperature=0, logprobs=3, presence_penalty=2.0), SamplingParams(temperature=0)]
    tokens, lps = sampler.sample(logits, make_batch(params, [[1], [1]], [[5], [5]]))
    ref = torch.log_softmax(logits[0], 0)
    assert abs(lps[0].logprob - ref[tokens[0]].item()) < 1e-5
    assert [t for t, _ in lps[0].top] == ref.topk(3).indices.tolist()
    assert lps[1] is None


def test_plain_greedy_fast_path_is_taken_only_when_nothing_else_applies():
    """The engine skips building a SamplingBatch when every row is a bare argmax; any setting
    that changes the result or asks for more must take the full sampler."""
    d = lambda **kw: SamplingParams(**kw).with_defaults({})  # as the engine holds them
    plain = d(temperature=0, top_k=5, top_p=0.5)  # filters do not change an argmax
    assert sampler.is_plain_greedy([plain, d(temperature=0)], [[], []])
    for other in (d(temperature=0.7), d(temperature=0, logprobs=0), d(temperature=0, logit_bias={3: 5.0}),
                  d(temperature=0, presence_penalty=0.5), d(temperature=0, frequency_penalty=0.5),
                  d(temperature=0, repetition_penalty=1.2)):
        assert not sampler.is_plain_greedy([plain, other], [[], []]), other
    assert not sampler.is_plain_greedy([plain], [[2]])  # a banned EOS (min_tokens) must be applied
    logits = torch.randn(4, 50)
    full, _ = sampler.sample(logits, make_batch([plain] * 4, [[]] * 4, [[]] * 4))
    assert full == logits.argmax(dim=-1).tolist()


def test_every_value_validation_allows_samples():
    """The bounds SamplingParams enforces are ones the sampler can take: the extreme allowed values
    (a top_k past the vocabulary, seeds at both ends of int64, the penalties' limits) sample a
    valid token, where a top_k of 2**64 used to overflow inside a step."""
    torch.manual_seed(5)
    logits = torch.randn(6, V) * 3
    params = [SamplingParams(temperature=1.0, top_k=2 ** 31 - 1),
              SamplingParams(temperature=1.0, seed=2 ** 63 - 1),
              SamplingParams(temperature=1.0, seed=-(2 ** 63)),
              SamplingParams(temperature=2.0, repetition_penalty=100.0, presence_penalty=2.0, frequency_penalty=-2.0),
              SamplingParams(temperature=0.5, repetition_penalty=0.01, min_p=1.0, top_p=1e-9),
              SamplingParams(temperature=1.0, logit_bias={V - 1: 100.0, 0: -100.0}, logprobs=20)]
    b = make_batch(params, [[1, 2]] * 6, [[3, 3]] * 6)
    b.generators = [None, torch.Generator().manual_seed(2 ** 63 - 1), torch.Generator().manual_seed(-(2 ** 63)),
                    None, None, None]
    tokens, lps = sampler.sample(logits, b)
    assert all(0 <= t < V for t in tokens)
    assert tokens[5] == V - 1 and len(lps[5].top) == 20
