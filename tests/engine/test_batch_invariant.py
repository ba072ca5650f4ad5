"""Batch-invariant mode: a request's tokens and logprobs are the same bits whatever else shares its
steps, however its prompt is chunked, and whether its prefix came from the prefix cache. Every
comparison is ==, never a tolerance.

Each check runs on lamina's C++ kernels (the cpu backend: a tiny random model whose heads the C++
attention takes, and the default model) and on the Triton kernels (interpreted on CPU where there is
no GPU, on the tiny model the other Triton tests use). Without the mode the cpu backend's checks
fail: a decode row that shares a step with a prompt chunk goes through the prefill attention kernel,
which rounds differently from the decode kernel it takes alone. (Interpreted Triton happens to pass
them either way: on CPU decode takes a single split, and numpy's dots round the same in both
kernels; on a GPU the decode split count follows the batch.)
"""
import dataclasses
import random

import pytest
import torch

from lamina.cli import build_parser, engine_config_from_args
from lamina.config import EngineConfig, ModelConfig
from lamina.engine.engine import LLMEngine
from lamina.engine.resolve import EAGER, resolve
from lamina.kernels.dispatch import RowPlan
from lamina.sampling_params import SamplingParams
from tests.engine.test_engine import run
from tests.utils import TINY, save_tiny_hf_model

GREEDY = SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=1234, logprobs=3, ignore_eos=True)
# lamina's GEMMs take output widths in blocks of 16: a vocabulary of 272 (the tokenizer's 259 ids fit)
TINY_VOCAB = 272


@pytest.fixture(scope="module")
def cpu_tiny_dir(tmp_path_factory):
    # head_dim 64 (two query heads on one KV head): the C++ attention's smallest
    path = tmp_path_factory.mktemp("tiny-bi-cpu")
    save_tiny_hf_model(path, vocab_size=TINY_VOCAB, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=256, max_position_embeddings=512)
    return str(path)


@pytest.fixture(scope="module")
def triton_tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bi-triton")
    save_tiny_hf_model(path, vocab_size=TINY_VOCAB, max_position_embeddings=512)
    return str(path)


# (attention backend, model fixture, prompt token range, lengths of prompts in a batch, of long
# prompts, tokens generated). The Triton interpreter runs a program per token and op: short prompts
# and answers keep it to a minute.
SETUPS = {
    "cpu": ("cpu", "cpu_tiny_dir", 256, (3, 150), (130, 200), 8),
    "triton": ("triton", "triton_tiny_dir", 256, (3, 24), (65, 90), 3),
    "cpu-default-model": ("cpu", "default_model_dir", 20000, (5, 200), (130, 200), 8),
}


@dataclasses.dataclass
class Setup:
    engine: object          # engine(**EngineConfig options) -> a batch-invariant LLMEngine
    prompts: object         # prompts(count, seed, long=False) -> random prompts
    greedy: SamplingParams
    seeded: SamplingParams


@pytest.fixture(params=["cpu", pytest.param("triton", marks=pytest.mark.slow),
                        pytest.param("cpu-default-model", marks=pytest.mark.slow)])
def setup(request) -> Setup:
    backend, model_fixture, vocab, lengths, long_lengths, max_tokens = SETUPS[request.param]
    if backend == "cpu":
        request.getfixturevalue("cpu_kernels")
    elif torch.cuda.is_available():
        # Triton runs interpreted only where there is no GPU (tests/conftest.py), and the mode is
        # refused on CUDA (test_what_cannot_be_batch_invariant_is_a_clear_error)
        pytest.skip("batch-invariant mode runs on CPU only; its Triton kernels are tested interpreted")
    model_dir = request.getfixturevalue(model_fixture)

    def engine(**kw):
        kw.setdefault("kv_cache_memory", 128 << 20)
        return LLMEngine(EngineConfig(model=model_dir, device="cpu", attention_backend=backend, batch_invariant=True,
                                      **kw))

    def prompts(count, seed, long=False):
        rng = random.Random(seed)
        lo, hi = long_lengths if long else lengths
        return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]
    return Setup(engine, prompts, dataclasses.replace(GREEDY, max_tokens=max_tokens),
                 dataclasses.replace(SEEDED, max_tokens=max_tokens))


def result(out):
    """What a request returned that must not move by a bit: its tokens, each one's logprob and the top."""
    c = out.outputs[0]
    return c.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in c.logprobs]


def generate(engine, requests, stagger=0):
    """Finished outputs of (prompt, params) requests, admitted `stagger` a step (0: all at once)."""
    pending, outs = list(enumerate(requests)), {}
    while pending or engine.has_unfinished_requests():
        for i, (prompt, params) in pending[:stagger or len(pending)]:
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
        pending = pending[stagger or len(pending):]
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    return [outs[f"r{i}"] for i in range(len(requests))]


def in_batches_of_16(engine, target, others):
    """`target` (a (prompt, params) request) alone, then at several positions among 15 other requests
    admitted 3 a step, so that its prompt and its decodes share steps with other prompts' chunks and
    decodes."""
    alone = result(generate(engine, [target])[0])
    for position in (0, 7, 15):
        batch = others[:position] + [target] + others[position:15]
        assert result(generate(engine, batch, stagger=3)[position]) == alone, f"at position {position}"


def test_alone_equals_anywhere_in_a_batch(setup):
    target, *others = setup.prompts(16, seed=0)
    in_batches_of_16(setup.engine(enable_prefix_caching=False), (target, setup.greedy),
                     [(p, setup.greedy) for p in others])


def test_seeded_sampling_alone_equals_in_a_batch(setup):
    """temperature > 0 with a seed: the same draws, so the same tokens and logprobs, beside greedy
    rows, rows of other seeds and unseeded rows (which draw from the engine's generator)."""
    target, *others = setup.prompts(16, seed=1)
    mix = [setup.greedy, dataclasses.replace(setup.seeded, seed=7), dataclasses.replace(setup.seeded, seed=None)]
    in_batches_of_16(setup.engine(enable_prefix_caching=False), (target, setup.seeded),
                     [(p, mix[i % 3]) for i, p in enumerate(others)])


def test_prefix_cache_hit_equals_a_miss(setup):
    first, tail = setup.prompts(2, seed=2, long=True)
    cached = setup.engine()
    run(cached, [first], setup.greedy)
    second = first + tail        # its first prompt's full blocks come from the cache
    hit = run(cached, [second], setup.greedy)[0]
    assert hit.num_cached_tokens >= 32
    miss = run(setup.engine(enable_prefix_caching=False), [second], setup.greedy)[0]
    assert miss.num_cached_tokens == 0
    assert result(hit) == result(miss)


def test_prefill_chunked_at_64_equals_whole(setup):
    long = setup.prompts(2, seed=3, long=True)
    whole = run(setup.engine(max_num_batched_tokens=2048, enable_prefix_caching=False), long, setup.greedy)
    chunked = run(setup.engine(max_num_batched_tokens=64, enable_prefix_caching=False), long, setup.greedy)
    assert [result(o) for o in chunked] == [result(o) for o in whole]


def test_speculative_decoding_changes_no_bit(setup):
    """n-gram drafts verified in a query of k+1 tokens give the bits of plain decoding: greedy and
    seeded, beside other requests. Each prompt is a text, the model's greedy continuation of it and
    the text again, so the n-gram lookup finds drafts the model may keep."""
    texts = setup.prompts(4, seed=4)
    continued = run(setup.engine(), texts, dataclasses.replace(setup.greedy, max_tokens=10, logprobs=None))
    prompts = [t + o.outputs[0].token_ids + t for t, o in zip(texts, continued)]
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    for params in (setup.greedy, setup.seeded):
        params = dataclasses.replace(params, max_tokens=2 * params.max_tokens)
        plain = run(setup.engine(), prompts, params)
        engine = setup.engine(speculative_config=spec)
        drafted = run(engine, prompts, params)
        assert engine.stats.spec_num_draft_tokens_total > 0
        assert [result(o) for o in drafted] == [result(o) for o in plain]



def test_self_draft_in_the_target_cache_changes_no_bit(setup, request):
    """The model's int4 copy drafts in the target's own KV cache, writing its K/V into the slots
    the verification step then computes: the target must overwrite every one before reading it, so
    greedy and seeded requests keep plain decoding's bits beside each other."""
    if request.node.callspec.params["setup"] == "triton":
        pytest.skip("lamina's int4 kernel is CPU code; the Triton path's spec test is the n-gram one above")
    prompts = setup.prompts(4, seed=5)
    spec = {"method": "draft_model", "quantization": "int4", "num_speculative_tokens": 3}
    for params in (setup.greedy, setup.seeded):
        params = dataclasses.replace(params, max_tokens=2 * params.max_tokens)
        plain = run(setup.engine(), prompts, params)
        engine = setup.engine(speculative_config=spec)
        assert engine.drafter.shares_cache
        drafted = run(engine, prompts, params)
        # a random model samples near-uniformly: only its greedy tokens are the draft's argmax
        assert engine.stats.spec_num_draft_tokens_total > 0
        assert engine.stats.spec_num_accepted_tokens_total > 0 or params.temperature > 0
        assert [result(o) for o in drafted] == [result(o) for o in plain]


# -- switching it on, and what it refuses ----------------------------------------------------------

BI_MODEL = ModelConfig(**{**TINY, "vocab_size": TINY_VOCAB, "hidden_size": 128, "num_attention_heads": 2,
                          "num_key_value_heads": 1, "intermediate_size": 256}, head_dim=64)


def _resolve(monkeypatch, **config):
    monkeypatch.delenv("LAMINA_ENFORCE_EAGER", raising=False)
    monkeypatch.setenv("LAMINA_AUTOTUNE", "0")   # the default mode's plan, unmeasured
    config = {"device": "cpu", "dtype": "bfloat16", **config}
    return resolve(EngineConfig(model="x", **config), "/nowhere", BI_MODEL)


def test_switched_on_by_the_option_or_the_environment(monkeypatch, cpu_kernels):
    monkeypatch.setenv("LAMINA_BATCH_INVARIANT", "1")
    rc = _resolve(monkeypatch)
    assert rc.batch_invariant and rc.backend.batch_invariant and rc.kernel_plan.batch_invariant
    assert rc.execution == EAGER and "batch-invariant" in rc.summary()
    assert rc.kernel_plan.linears and all(plan == RowPlan("lamina", "lamina", "lamina")
                                          for _, plan in rc.kernel_plan.linears)
    assert not _resolve(monkeypatch, batch_invariant=False).batch_invariant   # the option wins
    monkeypatch.delenv("LAMINA_BATCH_INVARIANT")
    rc = _resolve(monkeypatch)
    assert not rc.batch_invariant and not rc.backend.batch_invariant and "batch-invariant" not in rc.summary()
    assert _resolve(monkeypatch, batch_invariant=True).batch_invariant
    args = build_parser().parse_args(["generate", "--batch-invariant", "hello"])
    assert engine_config_from_args(args).batch_invariant is True
    assert engine_config_from_args(build_parser().parse_args(["serve"])).batch_invariant is None


def test_what_cannot_be_batch_invariant_is_a_clear_error(monkeypatch, cpu_kernels):
    with pytest.raises(ValueError, match="torch attention backend has no batch-invariant mode"):
        _resolve(monkeypatch, batch_invariant=True, attention_backend="torch")
    with pytest.raises(ValueError, match="--compile cannot serve batch-invariant mode"):
        _resolve(monkeypatch, batch_invariant=True, enforce_eager=False)
    with pytest.raises(ValueError, match="needs a bfloat16 model"):
        _resolve(monkeypatch, batch_invariant=True, dtype="float32")
    with pytest.raises(ValueError, match="on CPU only"):
        _resolve(monkeypatch, batch_invariant=True, device="cuda", attention_backend="triton")
    monkeypatch.setenv("LAMINA_DISPATCH", "bf16_linear.prefill=torch")
    with pytest.raises(ValueError, match="LAMINA_DISPATCH asks for bf16_linear"):
        _resolve(monkeypatch, batch_invariant=True)
    monkeypatch.setenv("LAMINA_DISPATCH", "attention.decode=torch")
    with pytest.raises(ValueError, match="LAMINA_DISPATCH asks for attention"):
        _resolve(monkeypatch, batch_invariant=True)
