"""torch.compile of the decode step changes speed, not tokens."""
import pytest

from lamina.sampling_params import SamplingParams
from tests.engine.agreement import assert_greedy_agree
from tests.engine.test_engine import make_engine, random_prompts, run


@pytest.mark.slow
def test_compiled_decode_matches_eager(tiny_model_dir):
    prompts = random_prompts(6, seed=11)
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=2, ignore_eos=True)
    eager = run(make_engine(tiny_model_dir), prompts, params)
    compiled_engine = make_engine(tiny_model_dir, enforce_eager=False)
    compiled = run(compiled_engine, prompts, params, stagger=2)
    assert compiled_engine.runner.compiled_forward is not None
    for a, b in zip(eager, compiled):
        assert_greedy_agree(a, b)
