"""torch.compile of the CPU steps changes speed, not tokens, and never recompiles while serving; the
steps compile in the background while the engine serves eagerly. Serving calls the compiled graphs
directly; tests/conftest.py has every step checked against the graph and inputs torch.compile's own
guards would give it (LAMINA_CHECK_COMPILED_DISPATCH), except where a test serves without that check."""
import pytest
import torch

from lamina.kernels.reference import GROUP_BY_LENGTH_MIN_BATCH
from lamina.sampling_params import SamplingParams
from tests.engine.agreement import assert_greedy_agree
from tests.engine.test_engine import make_engine as _make_engine
from tests.engine.test_engine import random_prompts, run
from tests.utils import count_step_calls


def make_engine(model_dir, **kw):
    """On the CPU even where there is a GPU: on CUDA compiled steps run inside CUDA graphs
    (tests/engine/test_cuda_graphs.py). A compiled engine is returned once its graphs are built."""
    engine = _make_engine(model_dir, device="cpu", **kw)
    assert engine.wait_until_compiled(timeout=900), engine.runner.compiled and engine.runner.compiled.error
    return engine


def head_dim_64_model(tmp_path, max_position_embeddings: int = 512) -> str:
    """A tiny random model whose head size the cpu backend's prefill attention takes, so that its
    prefill and mixed steps compile too (in bf16)."""
    from tests.utils import save_tiny_hf_model
    model_dir = str(tmp_path / "head-dim-64")
    save_tiny_hf_model(model_dir, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=256, max_position_embeddings=max_position_embeddings)
    return model_dir


@pytest.mark.slow
def test_compiled_decode_matches_eager(tiny_model_dir, monkeypatch):
    # batches grow one sequence per step up to 20 (past the torch backend's compiled limit, its
    # eager path; the cpu backend compiles them all), then shrink as they finish; block tables grow
    # from 1 block to 7. The graphs are called directly alone, as in serving: the check would run
    # each step a second time through torch.compile, writing the KV cache again.
    monkeypatch.setenv("LAMINA_CHECK_COMPILED_DISPATCH", "0")
    prompts = random_prompts(20, seed=11, lo=3, hi=90)
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=2, ignore_eos=True)
    eager = run(make_engine(tiny_model_dir, enforce_eager=True), prompts, params)
    compiled_engine = make_engine(tiny_model_dir, enforce_eager=False)
    compiled_steps = compiled_engine.runner.compiled
    assert compiled_steps.decode is not None and not compiled_steps.decode.check and GROUP_BY_LENGTH_MIN_BATCH <= 20
    # both graphs (batch 1; batches 2+) were built at start-up
    assert [first for first, _ in compiled_steps.decode.ranges] == [1, 2]
    calls = count_step_calls(compiled_steps, "decode")
    compiled = run(compiled_engine, prompts, params, stagger=1)
    single = run(compiled_engine, prompts[:1], params)
    assert calls["calls"] > 0 and 1 in calls["sizes"]
    if compiled_steps.max_decode_batch is None:  # the cpu backend: larger batches compiled too
        assert max(calls["sizes"]) >= GROUP_BY_LENGTH_MIN_BATCH
    else:
        assert max(calls["sizes"]) == compiled_steps.max_decode_batch == GROUP_BY_LENGTH_MIN_BATCH - 1
    for a, b in zip(eager, compiled):
        assert_greedy_agree(a, b)
    assert_greedy_agree(eager[0], single[0])


@pytest.mark.slow
def test_two_compiled_engines_in_one_process_keep_their_own_graphs(tiny_model_dir, tmp_path):
    """Module guards are dropped for speed, so each engine must compile its own graphs: a second
    model of another shape (3 layers, other weights) must not run the first one's graph."""
    from tests.utils import save_tiny_hf_model
    other_dir = tmp_path / "other"
    save_tiny_hf_model(other_dir, num_hidden_layers=3, max_position_embeddings=512, seed=5)
    prompts = random_prompts(3, seed=2)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)
    first = make_engine(tiny_model_dir, enforce_eager=False)
    second = make_engine(str(other_dir), enforce_eager=False)
    for model_dir, engine in ((tiny_model_dir, first), (str(other_dir), second)):
        eager = run(make_engine(model_dir, enforce_eager=True), prompts, params)
        for a, b in zip(eager, run(engine, prompts, params)):
            assert_greedy_agree(a, b)


@pytest.mark.slow
@pytest.mark.usefixtures("cpu_kernels")
def test_compiled_prefill_matches_eager_and_never_recompiles(tmp_path):
    """bf16 on the cpu backend: prefill and mixed steps run one compiled graph for every batch
    (single prompts padded with an empty sequence, chunks, decode rows alongside)."""
    model_dir = head_dim_64_model(tmp_path)
    prompts = random_prompts(12, seed=5, lo=3, hi=150)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
    eager = run(make_engine(model_dir, dtype="bfloat16", enforce_eager=True), prompts, params)
    # a 64-token budget: long prompts arrive in chunks, beside other sequences' decode rows
    engine = make_engine(model_dir, dtype="bfloat16", enforce_eager=False, max_num_batched_tokens=64)
    compiled_steps = engine.runner.compiled
    assert engine.config.backend.name == "cpu"
    assert compiled_steps.prefill is not None
    seen = {"calls": 0, "sizes": set()}
    inner = compiled_steps.prefill

    def counting(input_ids, positions, md):
        seen["calls"] += 1
        seen["sizes"].add(int(md.seq_lens.count_nonzero()))
        return inner(input_ids, positions, md)

    compiled_steps.prefill = counting
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(engine, prompts, params, stagger=2)
        single = run(engine, prompts[:1], params)
    assert seen["calls"] > 0 and 1 in seen["sizes"] and max(seen["sizes"]) >= 2
    for a, b in zip(eager, compiled):
        assert_greedy_agree(a, b)
    assert_greedy_agree(eager[0], single[0])


@pytest.mark.slow
def test_engine_serves_eagerly_while_compiling_then_swaps_in(tiny_model_dir):
    """The first answer never waits for torch.compile: requests run eagerly while the graphs build
    on a background thread (whose warm-up touches only the scratch block), and the compiled graphs
    serve once ready, with the same tokens."""
    prompts = random_prompts(6, seed=3, lo=3, hi=40)
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=2, ignore_eos=True)
    eager = run(_make_engine(tiny_model_dir, device="cpu", enforce_eager=True), prompts, params)
    engine = _make_engine(tiny_model_dir, device="cpu", enforce_eager=False)
    compiled_steps = engine.runner.compiled
    # answered before the compile is done, from the eager path, while the compile thread writes
    # its warm-up tokens: the outputs must not be disturbed
    during = run(engine, prompts, params)
    assert not compiled_steps.done.is_set(), "the test model compiled before its first answer"
    assert compiled_steps.wait(timeout=900), compiled_steps.error
    assert engine.runner.execution == "compiled CPU steps (ready)"
    calls = count_step_calls(compiled_steps, "decode")
    with torch._dynamo.config.patch(error_on_recompile=True):
        after = run(engine, prompts, params)
    assert calls["calls"] > 0
    for a, b, c in zip(eager, during, after):
        assert_greedy_agree(a, b)
        assert_greedy_agree(a, c)
    # the scratch block is the cache's last block, outside the scheduler's pool
    assert engine.runner.scratch_block == engine.block_manager.num_blocks
    assert engine.runner.k_caches[0].shape[0] == engine.block_manager.num_blocks + 1


@pytest.mark.slow
@pytest.mark.usefixtures("cpu_kernels")
def test_a_plan_that_switches_implementation_by_rows_never_recompiles_while_serving(tmp_path, monkeypatch):
    """Where the kernel dispatch gives a layer different implementations for decode, batch and
    prefill rows (as on a CPU where torch's matmul wins large products), each range of rows needs a
    graph of its own: all are built before the compiled steps serve, so serving never compiles, and
    the tokens agree with eager steps."""
    model_dir = head_dim_64_model(tmp_path, max_position_embeddings=1024)
    # the defaults (lamina's kernels where they take a layer; nothing measured, so the same plan on
    # any machine) with two classes switched to torch's matmul
    monkeypatch.setenv("LAMINA_AUTOTUNE", "0")
    monkeypatch.setenv("LAMINA_DISPATCH", "bf16_linear.batch=torch,bf16_swiglu.prefill=torch")
    prompts = random_prompts(20, seed=9, lo=3, hi=60) + random_prompts(2, seed=10, lo=150, hi=180)
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=2, ignore_eos=True)
    eager = run(make_engine(model_dir, dtype="bfloat16", enforce_eager=True), prompts, params)
    engine = make_engine(model_dir, dtype="bfloat16", enforce_eager=False, max_num_batched_tokens=512,
                         max_model_len=200)     # the 257-token prefill warm-up spans two sequences
    assert engine.config.kernel_plan.row_boundaries() == (16, 256)
    compiled_steps = engine.runner.compiled
    assert compiled_steps.decode_warm_ups == [1, 2, 17] and compiled_steps.prefill_warm_ups == [3, 17, 257]
    calls = count_step_calls(compiled_steps, "decode")
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(engine, prompts, params)    # all at once: prefill steps past 256 rows, decode past 16
    assert calls["calls"] > 0 and max(calls["sizes"]) > 16
    for a, b in zip(eager, compiled):
        assert_greedy_agree(a, b)


@pytest.mark.slow
def test_the_dispatch_check_fails_where_torch_compile_would_run_another_graph_or_inputs(tiny_model_dir):
    """The check the other tests serve under is real: a step given the graph for batches of 2+ at
    batch 1, or another tensor than torch.compile would read, fails loudly."""
    engine = make_engine(tiny_model_dir, enforce_eager=False)
    decode = engine.runner.compiled.decode
    assert decode.check
    ids, positions, md = engine.runner.compiled._warm_up_step(1, 1)
    with torch.inference_mode():
        decode(ids, positions, md)     # the right graph, the right inputs
        (_, single), (_, batched) = decode.ranges
        decode.ranges = [(1, batched), (2, single)]
        with pytest.raises(RuntimeError, match="not the one the engine picked"):
            decode(ids, positions, md)
        decode.ranges = [(1, single), (2, batched)]
        own_inputs = single.inputs
        single.inputs = lambda step: [t.clone() if isinstance(t, torch.Tensor) and t is step["positions"] else t
                                      for t in own_inputs(step)]
        with pytest.raises(RuntimeError, match="other inputs"):
            decode(ids, positions, md)


@pytest.mark.slow
@pytest.mark.usefixtures("cpu_kernels")
def test_compiled_int4_self_draft_matches_eager_plain_decoding(tmp_path, monkeypatch):
    """Speculative decoding as bench/speculative.py measures it: the model's int4 copy drafts through
    compiled decode graphs of its own, in the target's KV cache, and the target verifies through its
    compiled prefill graph. The graphs are called directly alone, as in serving; greedy tokens agree
    with plain eager decoding."""
    monkeypatch.setenv("LAMINA_CHECK_COMPILED_DISPATCH", "0")
    model_dir = head_dim_64_model(tmp_path)
    prompts = random_prompts(4, seed=12, lo=20, hi=120)
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=2, ignore_eos=True)
    eager = run(make_engine(model_dir, dtype="bfloat16", enforce_eager=True), prompts, params)
    engine = make_engine(model_dir, dtype="bfloat16", enforce_eager=False,
                         speculative_config={"method": "draft_model", "quantization": "int4",
                                             "num_speculative_tokens": 3})
    drafter = engine.drafter
    assert drafter.shares_cache and drafter.runner.compiled.status == "ready"
    assert engine.runner.compiled.prefill is not None
    drafts = count_step_calls(drafter.runner.compiled, "decode")
    prefill_steps = count_step_calls(engine.runner.compiled, "prefill")   # prompts and verifications
    compiled = run(engine, prompts, params, stagger=1)
    assert drafts["calls"] > 0 and prefill_steps["calls"] > 0
    assert engine.stats.spec_num_accepted_tokens_total > 0.5 * engine.stats.spec_num_draft_tokens_total > 0
    for a, b in zip(eager, compiled):
        assert_greedy_agree(a, b)
