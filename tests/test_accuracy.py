"""Faster number formats must keep what the model says: bf16 and int8 against float32."""
import math
import os

import pytest

from lamina import LLM, SamplingParams
from tests.engine.agreement import assert_greedy_agree

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Who wrote Romeo and Juliet?", "Explain gravity to a child.", "What is 12 times 7?",
           "Name a famous painter.", "Give me a tip for sleeping well."]
# bf16 and int8 round every matmul: where greedy paths part, the two runs' logprobs of the
# contested tokens must still agree this closely (and each choice be in the other's top 2)
TOLERANCE = {"bfloat16": 0.3, "int8": 0.3}


@pytest.fixture(scope="module")
def texts(default_model_dir):
    with open(os.path.join(os.path.dirname(__file__), "data", "perplexity.txt")) as f:
        return f.read()


def perplexity(llm, text):
    ids = llm.get_tokenizer().encode(text)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    lps = [r.logprob for r in out.prompt_logprobs[1:]]
    assert len(lps) == len(ids) - 1 > 200
    return math.exp(-sum(lps) / len(lps))


@pytest.fixture(scope="module")
def runs(default_model_dir, texts):
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=2, ignore_eos=True)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    results = {}
    for name, kw in {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
                     "int8": dict(dtype="bfloat16", quantization="int8")}.items():
        llm = LLM(default_model_dir, kv_cache_memory=256 << 20, **kw)
        results[name] = (llm.chat(convs, params), perplexity(llm, texts))
        del llm
    return results


@pytest.mark.parametrize("variant", ["bfloat16", "int8"])
def test_greedy_agrees_with_float32(runs, variant):
    for a, b in zip(runs["float32"][0], runs[variant][0]):
        assert_greedy_agree(a, b, tol=TOLERANCE[variant])


def test_perplexity_kept(runs):
    ref = runs["float32"][1]
    assert 1 < ref < 50, ref  # a sane English text for this model
    assert abs(runs["int8"][1] / ref - 1) < 0.02
    assert abs(runs["bfloat16"][1] / ref - 1) < 0.02
