"""torch.compile of the decode step changes speed, not tokens, and never recompiles while serving."""
import pytest
import torch

from lamina.engine.model_runner import COMPILED_MAX_BATCH
from lamina.sampling_params import SamplingParams
from tests.engine.agreement import assert_greedy_agree
from tests.engine.test_engine import make_engine, random_prompts, run


@pytest.mark.slow
def test_compiled_decode_matches_eager(tiny_model_dir):
    # batches grow one sequence per step up to 20 (past COMPILED_MAX_BATCH: the eager path), then
    # shrink as they finish; block tables grow from 1 block to 7
    prompts = random_prompts(20, seed=11, lo=3, hi=90)
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=2, ignore_eos=True)
    eager = run(make_engine(tiny_model_dir, enforce_eager=True), prompts, params)
    compiled_engine = make_engine(tiny_model_dir, enforce_eager=False)
    runner = compiled_engine.runner
    assert runner.compiled_forward is not None and COMPILED_MAX_BATCH < 20
    calls = {"compiled": 0, "sizes": set()}
    inner = runner.compiled_forward

    def counting(input_ids, positions, md):
        calls["compiled"] += 1
        calls["sizes"].add(md.num_seqs)
        return inner(input_ids, positions, md)

    runner.compiled_forward = counting
    # both graphs (batch 1; batches 2+) were built at start-up: serving must never compile again
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(compiled_engine, prompts, params, stagger=1)
        single = run(compiled_engine, prompts[:1], params)
    assert calls["compiled"] > 0 and 1 in calls["sizes"] and max(calls["sizes"]) == COMPILED_MAX_BATCH
    for a, b in zip(eager, compiled):
        assert_greedy_agree(a, b)
    assert_greedy_agree(eager[0], single[0])
