"""The engine's invariance checks again, on the real default model (chat prompts, real tokenizer)."""
import random

import pytest

from lamina.sampling_params import SamplingParams
from tests.engine.agreement import assert_greedy_agree
from tests.engine.test_engine import make_engine, one_at_a_time, run

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "a robot", "coffee", "mountains", "prime numbers", "Paris", "autumn", "a cat",
          "the moon", "trains", "music", "gardening", "chess", "rain", "bread", "rivers"]
PARAMS = SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(default_model_dir):
    from lamina.tokenizer import Tokenizer
    tok = Tokenizer(default_model_dir)
    rng = random.Random(0)
    out = []
    for i in range(64):
        ask = rng.choice(["Write a line about", "Tell me a fact about", "Describe", "Say something about"])
        conv = [{"role": "user", "content": f"{ask} {TOPICS[i % len(TOPICS)]}. ({i})"}]
        out.append(tok.encode(tok.apply_chat_template(conv), add_special_tokens=False))
    return out


def test_64_staggered_equal_one_at_a_time(default_model_dir, prompts):
    solo = one_at_a_time(make_engine(default_model_dir, kv_cache_memory=256 << 20), prompts, PARAMS)
    batched = run(make_engine(default_model_dir, kv_cache_memory=256 << 20), prompts, PARAMS, stagger=6)
    for a, b in zip(solo, batched):
        assert_greedy_agree(a, b)


def test_chunked_prefix_cached_and_preempted_agree(default_model_dir, prompts):
    longer = SamplingParams(max_tokens=24, temperature=0, logprobs=2, ignore_eos=True)
    base = run(make_engine(default_model_dir, kv_cache_memory=256 << 20, enable_prefix_caching=False),
               prompts[:8], longer)
    chunked = run(make_engine(default_model_dir, kv_cache_memory=256 << 20, max_num_batched_tokens=32),
                  prompts[:8], longer, stagger=3)
    # ~40-token prompts grow past their third block while decoding: with 12 blocks, sequences
    # admitted on prompt blocks alone must later be preempted to let the older ones grow
    tight_engine = make_engine(default_model_dir, num_kv_blocks=12)
    tight = run(tight_engine, prompts[:8], longer)
    assert tight_engine.stats.num_preemptions_total > 0
    for a, b, c in zip(base, chunked, tight):
        assert_greedy_agree(a, b)
        assert_greedy_agree(a, c)
    # a second chat turn reuses the first turn's blocks and says the same as without the cache
    cached_engine = make_engine(default_model_dir, kv_cache_memory=256 << 20)
    first = run(cached_engine, prompts[:4], PARAMS)
    turn2 = [p + o.outputs[0].token_ids + p[-5:] for p, o in zip(prompts[:4], first)]
    hit = run(cached_engine, turn2, PARAMS)
    miss = run(make_engine(default_model_dir, kv_cache_memory=256 << 20, enable_prefix_caching=False), turn2, PARAMS)
    for a, b, prompt in zip(hit, miss, turn2):
        assert a.num_cached_tokens >= 32
        assert_greedy_agree(a, b)
