"""The engine resolves its "auto" settings once, into a frozen config that everything below reads."""
import dataclasses

import pytest
import torch

from lamina.config import EngineConfig, ModelConfig
from lamina.engine.resolve import COMPILED, EAGER, resolve, resolve_execution
from lamina.kernels import get_backend
from lamina.sampling_params import SamplingParams
from tests.engine.test_engine import make_engine, random_prompts, run
from tests.utils import TINY


def _resolve(monkeypatch, eager_env=None, **config):
    if eager_env is None:
        monkeypatch.delenv("LAMINA_ENFORCE_EAGER", raising=False)
    else:
        monkeypatch.setenv("LAMINA_ENFORCE_EAGER", eager_env)
    return resolve(EngineConfig(model="x", device="cpu", **config), "/nowhere", ModelConfig(head_dim=16, **TINY))


def test_resolved_config_is_concrete_and_frozen(monkeypatch):
    rc = _resolve(monkeypatch, attention_backend="torch", dtype="bfloat16")
    assert rc.device == torch.device("cpu") and rc.dtype == torch.bfloat16
    assert rc.kv_cache_dtype == torch.float32          # torch's CPU attention is faster in float32
    assert rc.kv_cache_memory == 4 << 30 and rc.max_model_len == TINY["max_position_embeddings"]
    assert rc.execution == COMPILED and rc.backend.compiled_decode_max_batch is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        rc.dtype = torch.float32
    assert "attention torch" in rc.summary() and "steps compiled" in rc.summary()


def test_execution_follows_flag_then_environment(monkeypatch):
    assert _resolve(monkeypatch, eager_env="1", attention_backend="torch").execution == EAGER
    # an explicit --compile wins over the environment
    assert _resolve(monkeypatch, eager_env="1", attention_backend="torch", enforce_eager=False).execution == COMPILED
    assert _resolve(monkeypatch, attention_backend="torch", enforce_eager=True).execution == EAGER


def test_a_backend_that_cannot_be_compiled_runs_eagerly(monkeypatch):
    """Triton's interpreter on CPU cannot be traced by torch.compile: the engine says so and runs
    eagerly instead of failing inside Dynamo."""
    monkeypatch.delenv("LAMINA_ENFORCE_EAGER", raising=False)
    execution, reason = resolve_execution(None, torch.device("cpu"), get_backend("triton", "cpu"))
    assert execution == EAGER and "triton" in reason


def test_triton_backend_on_cpu_serves_with_compile_asked(tiny_model_dir):
    engine = make_engine(tiny_model_dir, device="cpu", attention_backend="triton", enforce_eager=False)
    assert engine.config.execution == EAGER and engine.runner.compiled is None
    reference = run(make_engine(tiny_model_dir, device="cpu", attention_backend="torch"), random_prompts(2, seed=3),
                    SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    out = run(engine, random_prompts(2, seed=3), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in reference]


def test_engine_settles_the_kv_blocks_and_context_in_its_config(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=4, max_model_len=128)
    # 4 blocks of 16 hold 64 tokens: the context shrinks to what one sequence can have
    assert engine.config.num_kv_blocks == 4 and engine.config.max_model_len == 64 == engine.max_model_len
