"""Nothing the engine does for speed may change what the model says."""
import random

import pytest

from lamina.config import EngineConfig
from lamina.engine.engine import LLMEngine
from lamina.engine.errors import ContextLengthExceeded, RequestError
from lamina.sampling_params import SamplingParams
from tests.engine.agreement import assert_greedy_agree

GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)


def make_engine(model_dir, **kw):
    kw.setdefault("kv_cache_memory", 32 << 20)
    kw.setdefault("dtype", "float32")
    return LLMEngine(EngineConfig(model=model_dir, **kw))


def random_prompts(count, seed=0, lo=3, hi=90, vocab=256):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def run(engine, prompts, params=GREEDY, stagger=0, check_blocks=True):
    """Run prompts through the engine; with stagger=k, admit k new prompts per step."""
    pending = list(enumerate(prompts))
    outs = {}
    while pending or engine.has_unfinished_requests():
        take = len(pending) if not stagger else stagger
        for i, p in pending[:take]:
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
        pending = pending[take:]
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        if check_blocks:
            engine.block_manager.check_invariants()
            live = {b for s in engine.scheduler.running for b in s.block_table}
            held = {b for b, r in enumerate(engine.block_manager.ref_counts) if r > 0}
            assert held == live, "a block is held by nothing running (leak) or used while free"
    return [outs[f"r{i}"] for i in range(len(prompts))]


def one_at_a_time(engine, prompts, params=GREEDY):
    return [run(engine, [p], params)[0] for p in prompts]


def test_batched_staggered_equals_one_at_a_time(tiny_model_dir):
    prompts = random_prompts(64)
    solo = one_at_a_time(make_engine(tiny_model_dir), prompts)
    batched = run(make_engine(tiny_model_dir), prompts, stagger=5)
    for a, b in zip(solo, batched):
        assert_greedy_agree(a, b)


def test_prefix_cache_on_off_and_second_turn_hits(tiny_model_dir):
    prompts = random_prompts(16, seed=1, lo=20, hi=80)
    shared = prompts[0][:40]
    prompts += [shared + p[:10] for p in prompts[1:5]]   # shared prefixes across requests
    on, off = make_engine(tiny_model_dir), make_engine(tiny_model_dir, enable_prefix_caching=False)
    first_on, first_off = run(on, prompts, stagger=3), run(off, prompts, stagger=3)
    for a, b in zip(first_on, first_off):
        assert_greedy_agree(a, b)
    # a second turn: the first turn's prompt and answer, then more tokens
    turn2 = [p + o.outputs[0].token_ids + [7, 8, 9] for p, o in zip(prompts, first_on)]
    second_on, second_off = run(on, turn2), run(off, turn2)
    for a, b in zip(second_on, second_off):
        assert_greedy_agree(a, b)
    for prompt, out in zip(turn2, second_on):
        # every full block of the first turn that was computed is reused
        assert out.num_cached_tokens >= ((len(prompt) - 3 - 1) // 16 - 1) * 16
        assert out.num_cached_tokens > 0
    assert all(o.num_cached_tokens == 0 for o in second_off)
    assert on.stats.prefix_cache_hits_total > 0


def test_chunked_prefill_matches_whole(tiny_model_dir):
    prompts = random_prompts(12, seed=2, lo=40, hi=150)
    whole = run(make_engine(tiny_model_dir, max_num_batched_tokens=4096), prompts)
    chunked_engine = make_engine(tiny_model_dir, max_num_batched_tokens=32)
    chunked = run(chunked_engine, prompts, stagger=2)
    for a, b in zip(whole, chunked):
        assert_greedy_agree(a, b)


def test_preemption_keeps_tokens(tiny_model_dir):
    prompts = random_prompts(24, seed=3, lo=30, hi=60)
    params = SamplingParams(max_tokens=40, temperature=0, logprobs=2, ignore_eos=True)
    ample = run(make_engine(tiny_model_dir), prompts, params)
    # 16 blocks of 16 tokens: room for only a few of these sequences at once
    small = make_engine(tiny_model_dir, num_kv_blocks=16)
    tight = run(small, prompts, params)
    assert small.stats.num_preemptions_total > 0
    for a, b in zip(ample, tight):
        assert_greedy_agree(a, b)
    assert small.block_manager.num_used_blocks == 0


def test_abort_anywhere_frees_everything(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_num_batched_tokens=32)
    prompts = random_prompts(6, seed=4, lo=50, hi=100)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=50, temperature=0))
    engine.abort("r5")                     # still waiting
    engine.step()
    engine.abort("r0")                     # mid-prefill (32-token chunks)
    for _ in range(8):
        engine.step()
    engine.abort("r1")                     # decoding by now
    outs = []
    for _ in range(3):
        outs += engine.step()
    aborted = {o.request_id for o in outs if o.finished and o.finish_reason == "abort"}
    assert {"r1"} <= aborted
    for rid in ("r2", "r3", "r4"):
        engine.abort(rid)
    engine.step()
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.has_unfinished_requests()


def test_requests_that_cannot_fit_are_refused(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_model_len=128)
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 128 tokens"):
        engine.add_request("a", {"prompt_token_ids": [1] * 120}, SamplingParams(max_tokens=20))
    with pytest.raises(ContextLengthExceeded):
        engine.add_request("b", {"prompt_token_ids": [1] * 128}, SamplingParams(max_tokens=None))
    # a cache smaller than the context shrinks the context, so any admitted request can finish
    small = make_engine(tiny_model_dir, max_model_len=128, num_kv_blocks=4)
    assert small.max_model_len == 64
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 64 tokens"):
        small.add_request("c", {"prompt_token_ids": [1] * 60}, SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("d", {"prompt_token_ids": []}, SamplingParams())
    assert not engine.has_unfinished_requests()


def test_n_samples_share_prompt_blocks(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    prompt = random_prompts(1, seed=5, lo=70, hi=70)[0]
    engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(n=4, max_tokens=5, temperature=1.0, seed=3))
    final = None
    shared_seen = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
        tables = [s.block_table for s in engine.scheduler.running]
        if len(tables) == 4:
            first_blocks = {t[0] for t in tables}
            shared_seen |= len(first_blocks) == 1
    assert shared_seen, "the 4 samples did not share their first prompt block"
    assert [o.index for o in final.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 5 for o in final.outputs)


def test_max_tokens_min_tokens_stop_token_ids(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    free = run(engine, [prompt["prompt_token_ids"]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    toks = free.outputs[0].token_ids
    assert len(toks) == 10 and free.finish_reason == "length"
    stop_at = toks[3]
    first = toks.index(stop_at)
    out = run(engine, [prompt["prompt_token_ids"]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                                  stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    assert out.outputs[0].token_ids == toks[:first + 1]
    # min_tokens bans the stop id until enough tokens exist
    out = run(engine, [prompt["prompt_token_ids"]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                                  stop_token_ids=[stop_at], min_tokens=first + 2))[0]
    assert len(out.outputs[0].token_ids) >= first + 2
    assert stop_at not in out.outputs[0].token_ids[:first + 2]


def test_seed_reproducible_alone_and_in_busy_batch(tiny_model_dir):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    prompt = random_prompts(1, seed=6)[0]
    alone = run(make_engine(tiny_model_dir), [prompt], params)[0].outputs[0].token_ids
    others = random_prompts(20, seed=7)
    busy_engine = make_engine(tiny_model_dir)
    noisy = SamplingParams(max_tokens=16, temperature=1.0)
    for i, p in enumerate(others):
        busy_engine.add_request(f"o{i}", {"prompt_token_ids": p}, noisy)
    busy = run(busy_engine, [prompt], params)[0].outputs[0].token_ids
    assert alone == busy
    other_seed = run(make_engine(tiny_model_dir), [prompt], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9,
                                                                         seed=99))[0].outputs[0].token_ids
    assert other_seed != alone


def test_stats_track_steps(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    run(engine, random_prompts(3, seed=8), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    st = engine.stats
    assert st.generation_tokens_total == 12
    assert st.prompt_tokens_total == sum(len(p) for p in random_prompts(3, seed=8))
    assert st.prefix_cache_queries_total == st.prompt_tokens_total
    assert st.request_success_total == {"length": 3}
    assert st.time_to_first_token.count == 3 and st.e2e_request_latency.count == 3
    assert st.inter_token_latency.count == 9
    assert st.num_running == 0 and st.kv_blocks_used == 0
    assert st.kv_blocks_used + st.kv_blocks_cached + st.kv_blocks_free == st.kv_blocks_total


def test_max_tokens_zero_scores_the_prompt(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    out = run(engine, [prompt], SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    assert out.finished and out.outputs[0].token_ids == [] and out.finish_reason == "length"
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    assert [r.token_id for r in out.prompt_logprobs[1:]] == prompt[1:]
    # the logprob of each prompt token equals what decoding that prefix would report for it
    for k in (1, 4):
        # force the prompt's next token with a bias; logprobs come from the unbiased logits
        forced = SamplingParams(max_tokens=1, temperature=0, logprobs=0, logit_bias={prompt[k]: 100})
        nxt = run(engine, [prompt[:k]], forced)[0].outputs[0].logprobs[0]
        assert nxt.token_id == prompt[k]
        assert abs(nxt.logprob - out.prompt_logprobs[k].logprob) < 1e-4


def test_penalties_reach_the_sampler_through_the_engine(tiny_model_dir):
    """The engine hands token histories to the sampler only when a penalty is set; check it does then."""
    engine = make_engine(tiny_model_dir)
    prompt = [[5, 6, 7, 8]]
    plain = run(engine, prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself greedily
    fresh = run(engine, prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                               frequency_penalty=2.0, presence_penalty=2.0,
                                               repetition_penalty=2.0))[0].outputs[0].token_ids
    assert fresh != plain
    assert len(set(fresh)) > len(set(plain))
