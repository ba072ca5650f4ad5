"""Speculative decoding (n-gram drafts): the tokens of plain decoding, greedy, batched and preempted;
the target distribution kept exactly when sampling; stops, max_tokens, abort and the cache's
accounting; the counters."""
import collections
import math
import random

import pytest
import torch

from lamina.engine import speculative
from lamina.engine.speculative import SpeculativeConfig, propose_ngram, verify
from lamina.sampling_params import SamplingParams
from tests.engine.test_engine import make_engine, run

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def _looping_prompts(count, seed=0):
    """Prompts that repeat themselves, so the n-gram lookup finds drafts from the first step."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        motif = [rng.randrange(256) for _ in range(rng.randint(3, 8))]
        out.append((motif * 6)[:rng.randint(20, 48)])
    return out


def test_config_parsing():
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}')
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min) == (3, 4, 1)
    for bad in [{"method": "ngram"}, {"method": "eagle", "num_speculative_tokens": 2},
                {"num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 2},
                {"num_speculative_tokens": 2, "typo": 1}, "not json"]:
        with pytest.raises(ValueError):
            SpeculativeConfig.parse(bad)


def test_ngram_lookup():
    assert propose_ngram([1, 2, 3, 4, 5, 9, 1, 2, 3], 3, 3, 1) == [4, 5, 9]
    assert propose_ngram([7, 1, 2, 3, 8, 2, 3], 2, 3, 2) == [8, 2]     # "2 3" last seen before 8
    assert propose_ngram([1, 2, 3], 4, 3, 1) == []
    assert propose_ngram([5, 6, 5], 4, 1, 1) == [6, 5]


def test_verify_keeps_the_target_distribution():
    """Whatever the draft, the first token verify() returns is distributed as the target's p: the
    accept-or-resample rule is exact (checked against p over 40,000 draws)."""
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    gen = torch.Generator().manual_seed(1)
    for draft_token in (0, 3, 4):
        probs = torch.stack([p, p])   # one draft position, then the bonus position
        counts = collections.Counter(verify(probs, False, [draft_token], gen)[0] for _ in range(40_000))
        freq = torch.tensor([counts[i] / 40_000 for i in range(5)])
        assert torch.allclose(freq, p, atol=0.01), (draft_token, freq)
    # greedy: the argmax wherever the draft differs, all of the draft where it agrees, then one more
    probs = torch.eye(5)[[1, 2, 3]]
    assert verify(probs, True, [1, 2], None) == [1, 2, 3]
    assert verify(probs, True, [1, 4], None) == [1, 2]


def test_greedy_tokens_and_logprobs_equal_plain_decoding(tiny_model_dir):
    prompts = _looping_prompts(6, seed=1)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
    plain = run(make_engine(tiny_model_dir), prompts, params)
    engine = make_engine(tiny_model_dir, speculative_config=NGRAM)
    alone = [run(engine, [p], params)[0] for p in prompts[:2]]
    batched = run(engine, prompts, params)
    assert engine.stats.spec_num_accepted_tokens_total > 0      # drafts were kept, not only tried
    for a, b in zip(plain, batched):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
    for a, b in zip(plain, alone):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert batched[0].metrics.spec_drafted >= batched[0].metrics.spec_accepted > 0


def test_greedy_with_preemption_and_n(tiny_model_dir):
    prompts = _looping_prompts(4, seed=2)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    plain = run(make_engine(tiny_model_dir), prompts, params)
    engine = make_engine(tiny_model_dir, speculative_config=NGRAM, num_kv_blocks=14, max_num_batched_tokens=32)
    outs = run(engine, prompts, params, stagger=1)   # run() checks block accounting after every step
    assert engine.stats.num_preemptions_total > 0 and engine.stats.spec_num_accepted_tokens_total > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    # n samples, each drafting on its own
    many = run(make_engine(tiny_model_dir, speculative_config=NGRAM), prompts[:1],
               SamplingParams(max_tokens=30, temperature=0, n=3, ignore_eos=True))[0]
    assert all(o.token_ids == plain[0].outputs[0].token_ids[:30] for o in many.outputs)


def test_sampling_distribution_matches_plain_decoding(tiny_model_dir):
    """Sampled tokens have the same distribution with and without speculation: the total variation
    distance of their empirical distributions at each position stays within sampling noise. The
    prompt is a text, the model's own greedy continuation of it, and the text again, so the n-gram
    lookup drafts that continuation and the model often keeps it."""
    text = [random.Random(5).randrange(256) for _ in range(12)]
    greedy = run(make_engine(tiny_model_dir), [text], SamplingParams(max_tokens=12, temperature=0))[0]
    prompt = text + greedy.outputs[0].token_ids + text
    params = dict(max_tokens=6, temperature=0.8, top_k=4, n=300, ignore_eos=True)

    def draws(engine):
        out = []
        for seed in range(4):
            outs = run(engine, [prompt], SamplingParams(**params, seed=1000 * seed))[0].outputs
            out += [tuple(o.token_ids) for o in outs]
        return out
    spec_engine = make_engine(tiny_model_dir, speculative_config=NGRAM)
    with_spec, without = draws(spec_engine), draws(make_engine(tiny_model_dir))
    stats = spec_engine.stats
    # both paths of the rule run many times: drafts kept, and drafts rejected and resampled
    assert stats.spec_num_accepted_tokens_total > 300 and stats.spec_num_draft_tokens_total > 3000
    for position in range(1, 6):
        a = collections.Counter(t[position] for t in with_spec)
        b = collections.Counter(t[position] for t in without)
        assert _same_distribution_p(a, b) > 1e-3, (position, a, b)


def _same_distribution_p(a: collections.Counter, b: collections.Counter) -> float:
    """p-value of a chi-square test that two samples come from one distribution (categories with
    fewer than 10 draws in both pooled into one; Wilson-Hilferty's approximation of the tail)."""
    na, nb = sum(a.values()), sum(b.values())
    big = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
    cells = [(a[k], b[k]) for k in big]
    cells.append((na - sum(x for x, _ in cells), nb - sum(y for _, y in cells)))
    cells = [c for c in cells if sum(c)]
    stat = 0.0
    for x, y in cells:
        total = x + y
        ea, eb = total * na / (na + nb), total * nb / (na + nb)
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    dof = max(len(cells) - 1, 1)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_stops_max_tokens_and_abort(tiny_model_dir):
    prompts = _looping_prompts(3, seed=4)
    engine = make_engine(tiny_model_dir, speculative_config=NGRAM)
    plain = run(make_engine(tiny_model_dir), prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    for max_tokens in (1, 2, 5, 7):
        outs = run(engine, prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        for o, p in zip(outs, plain):
            assert len(o.outputs[0].token_ids) == max_tokens and o.finish_reason == "length"
            assert o.outputs[0].token_ids == p.outputs[0].token_ids[:max_tokens]
    # a stop token inside an accepted run ends the output there, the rest of the run dropped
    for o, p in zip(run(engine, prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                       stop_token_ids=[pl.outputs[0].token_ids[9] for pl in plain])),
                    plain):
        ids = p.outputs[0].token_ids
        cut = ids.index(o.outputs[0].stop_reason)
        assert o.outputs[0].token_ids == ids[:cut + 1] and o.finish_reason == "stop"
    # abort mid-run: its blocks come back
    engine.add_request("gone", {"prompt_token_ids": prompts[0]},
                       SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    for _ in range(4):
        engine.step()
    engine.abort("gone")
    engine.step()
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0


def test_drafting_stops_where_it_does_not_pay(tiny_model_dir, monkeypatch):
    """Drafts that keep being rejected switch drafting off for that sequence."""
    monkeypatch.setattr(speculative, "propose_ngram", lambda tokens, k, hi, lo: [0] * k)   # always wrong
    engine = make_engine(tiny_model_dir, speculative_config=NGRAM)
    prompts = [[5, 9, 13, 17, 21]]
    out = run(engine, prompts, SamplingParams(max_tokens=80, temperature=0, ignore_eos=True))[0]
    assert out.metrics.spec_drafted <= speculative.ADAPT_AFTER_TOKENS + NGRAM["num_speculative_tokens"]
    plain = run(make_engine(tiny_model_dir), prompts, SamplingParams(max_tokens=80, temperature=0, ignore_eos=True))
    assert out.outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_counters_on_the_server(tiny_model_dir):
    """/metrics counts drafts, draft tokens and accepted tokens (per position too), as the engine
    does; the stats line gives the mean acceptance length."""
    from lamina.engine.async_engine import AsyncEngine
    from tests.server.conftest import LoopThread, start_app
    from tests.server.helpers import http, metric, metrics
    engine = AsyncEngine(make_engine(tiny_model_dir, speculative_config=NGRAM))
    loop = LoopThread()
    srv = start_app(loop, engine, served_model_names=["tiny"])
    try:
        for prompt in _looping_prompts(3, seed=6):
            r = http(srv.port, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 30,
                                                          "temperature": 0, "ignore_eos": True})
            assert r.status == 200
        values = metrics(srv.port)
        stats = engine.engine.stats
        assert metric(values, "lamina:spec_decode_num_drafts_total") == stats.spec_num_drafts_total > 0
        assert metric(values, "lamina:spec_decode_num_draft_tokens_total") == stats.spec_num_draft_tokens_total
        accepted = metric(values, "lamina:spec_decode_num_accepted_tokens_total")
        assert accepted == stats.spec_num_accepted_tokens_total > 0
        assert metric(values, "lamina:spec_decode_num_accepted_tokens_per_pos", position=0) > 0
        assert sum(stats.spec_accepted_per_position) == accepted
        assert "mean acceptance length" in stats.log_line()
    finally:
        srv.stop()
        engine.shutdown()
        loop.close()


# -- draft_model ---------------------------------------------------------------------------------
def _draft(quantization=None, k=3, **extra):
    return {"method": "draft_model", "num_speculative_tokens": k, "quantization": quantization, **extra}


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_draft_model_greedy_equals_plain(tiny_model_dir, quantization):
    """The model drafting for itself (exact, or its int8/int4 copy): plain decoding's tokens,
    batched and with the target's cache so small that sequences are preempted; every block of the
    draft's cache back in its pool at the end."""
    prompts = _looping_prompts(4, seed=7)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    plain = run(make_engine(tiny_model_dir), prompts, params)
    engine = make_engine(tiny_model_dir, speculative_config=_draft(quantization), num_kv_blocks=16,
                         max_num_batched_tokens=32)
    outs = run(engine, prompts, params, stagger=1)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    stats = engine.stats
    assert engine.stats.num_preemptions_total > 0
    if quantization is None:   # the same model drafts exactly what it then verifies
        assert stats.spec_num_accepted_tokens_total == stats.spec_num_draft_tokens_total > 100
    else:
        assert stats.spec_num_accepted_tokens_total > 0.5 * stats.spec_num_draft_tokens_total
    # the model's own weights draft in its cache: no cache, shadow or prompt computation of their own
    assert engine.drafter.shares_cache and engine.drafter.blocks is engine.block_manager
    assert engine.drafter.runner.k_caches is engine.runner.k_caches and not engine.drafter.shadows
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0


def test_a_smaller_draft_model_in_its_own_cache(tiny_model_dir, tmp_path):
    """Another model with the same tokenizer (one layer, other heads, other weights) drafts in a
    cache of its own, catching up on what the target committed: plain decoding's tokens, with the
    target preempting, and every block of the draft's cache back in its pool at the end."""
    from tests.utils import save_tiny_hf_model
    save_tiny_hf_model(tmp_path, seed=1, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=512)
    prompts = _looping_prompts(4, seed=9)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = run(make_engine(tiny_model_dir), prompts, params)
    engine = make_engine(tiny_model_dir, speculative_config=_draft(model=str(tmp_path)), num_kv_blocks=16,
                         max_num_batched_tokens=32)
    assert not engine.drafter.shares_cache and engine.drafter.blocks is not engine.block_manager
    outs = run(engine, prompts, params, stagger=1)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert engine.stats.num_preemptions_total > 0 and engine.stats.spec_num_draft_tokens_total > 0
    engine.drafter.blocks.check_invariants()
    assert engine.drafter.blocks.num_used_blocks == 0 and not engine.drafter.shadows


def test_draft_model_sampling_and_n(tiny_model_dir):
    """Seeded sampling with n samples: reproducible, and each sample drafts on its own."""
    engine = make_engine(tiny_model_dir, speculative_config=_draft("int8"))
    params = SamplingParams(max_tokens=20, temperature=0.7, top_k=5, seed=3, n=3, ignore_eos=True)
    a = run(engine, _looping_prompts(2, seed=8), params)
    b = run(engine, _looping_prompts(2, seed=8), params)
    assert [[o.token_ids for o in x.outputs] for x in a] == [[o.token_ids for o in x.outputs] for x in b]
    assert engine.stats.spec_num_accepted_tokens_total > 0 and not engine.drafter.shadows


def test_draft_model_needs_the_same_tokenizer(tiny_model_dir, tmp_path):
    import json
    import shutil
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 259, "content": "<|extra|>"})
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="another tokenizer"):
        make_engine(tiny_model_dir, speculative_config=_draft(model=str(other)))
