"""The cpu attention backend in a whole engine: its bf16 KV cache and the torch backend's float32
one give the same greedy tokens (by the agreement rule)."""
import pytest
import torch

from tests.engine.agreement import assert_greedy_agree
from tests.engine.test_engine import make_engine, random_prompts, run

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips only where no build is expected (conftest.py)


def test_cpu_backend_keeps_a_bf16_cache_and_agrees_with_torch(tiny_model_dir):
    engines = {name: make_engine(tiny_model_dir, dtype="bfloat16", attention_backend=name)
               for name in ("cpu", "torch")}
    # 'auto': the cpu backend's C++ decode reads bf16 directly; torch's attention wants float32
    assert engines["cpu"].runner.kv_dtype == torch.bfloat16
    assert engines["torch"].runner.kv_dtype == torch.float32
    prompts = random_prompts(20, seed=3)  # 20 at once: decode batches past the length-grouping size
    outs = {name: run(engine, prompts) for name, engine in engines.items()}
    for a, b in zip(outs["torch"], outs["cpu"]):
        assert_greedy_agree(a, b)
