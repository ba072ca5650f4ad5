"""--trace-dir writes a Chrome/Perfetto trace of the engine's steps; --profile-torch-steps adds torch's
op-level trace; --profile-steps reports each kind of step's GB/s and GFLOP/s beside the machine's peaks."""
import asyncio
import glob
import json
import os

import pytest
import torch

from lamina.engine.async_engine import AsyncEngine
from lamina.engine.profiler import StepCosts
from lamina.sampling_params import SamplingParams
from tests.engine.test_engine import make_engine, random_prompts, run

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PHASES = {"schedule", "prepare", "forward", "sample", "detokenize"}


def _events(trace_dir, pattern="lamina-steps-*.json"):
    (path,) = glob.glob(os.path.join(trace_dir, pattern))
    with open(path) as f:
        return json.load(f)     # strict JSON once the engine is closed


def test_trace_has_a_span_per_step_and_phase_with_the_steps_work(tiny_model_dir, tmp_path):
    prompts = random_prompts(5, seed=4, lo=10, hi=80)
    engine = make_engine(tiny_model_dir, trace_dir=str(tmp_path), enable_prefix_caching=False,
                         max_num_batched_tokens=64)
    outs = run(engine, prompts, PARAMS, stagger=2)
    engine.close()
    events = _events(tmp_path)
    steps = [e for e in events if e["name"].startswith("step (")]
    phases = [e for e in events if e["name"] in PHASES]
    assert steps and {e["name"] for e in phases} == PHASES
    assert all(e["ph"] == "X" and e["dur"] >= 0 for e in events)
    # every phase lies inside a step's span
    for p in phases:
        assert any(s["ts"] - 1 <= p["ts"] and p["ts"] + p["dur"] <= s["ts"] + s["dur"] + 1 for s in steps), p
    # the steps' arguments account for every token: each prompt once (no prefix cache), and each
    # generated token but the last one (sampled, never fed back)
    assert sum(s["args"]["prefill_tokens"] for s in steps) == sum(map(len, prompts))
    assert sum(s["args"]["decode_tokens"] for s in steps) == sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    assert max(s["args"]["num_seqs"] for s in steps) >= 2
    assert {s["name"] for s in steps} >= {"step (prefill)", "step (decode)"}
    for s in steps:
        assert s["args"]["drafted_tokens"] == 0 == s["args"]["accepted_tokens"]


def test_async_engine_traces_the_stream_phase_and_closes_the_file(tiny_model_dir, tmp_path):
    engine = AsyncEngine(make_engine(tiny_model_dir, trace_dir=str(tmp_path)))

    async def main():
        return [out async for out in engine.generate([5, 6, 7, 8], PARAMS)]

    try:
        outs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert outs[-1].finished
    assert "stream" in {e["name"] for e in _events(tmp_path)}


def test_torch_profiler_traces_the_first_steps(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir, trace_dir=str(tmp_path), profile_torch_steps=2)
    run(engine, random_prompts(2, seed=1), PARAMS)
    engine.close()
    trace = _events(tmp_path, "torch-steps-*.json")
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names), sorted(names)[:20]
    # starting torch's profiler is a span of its own, not charged to the step's first phase
    steps = _events(tmp_path)
    (start,) = [e for e in steps if e["name"] == "start torch profiler"]
    first_prepare = min((e for e in steps if e["name"] == "prepare"), key=lambda e: e["ts"])
    assert first_prepare["ts"] >= start["ts"] + start["dur"] - 1
    with pytest.raises(ValueError, match="trace_dir"):
        make_engine(tiny_model_dir, profile_torch_steps=2)


def test_profile_report_gives_roofline_figures_per_kind_of_step(tiny_model_dir):
    engine = make_engine(tiny_model_dir, profile_steps=True)
    run(engine, random_prompts(4, seed=2, lo=20, hi=60), PARAMS)
    report = engine.profile_report()
    assert "ms per step" in report and "bf16 matmul" in report and "GFLOP/s" in report
    rows = [line.split() for line in report.splitlines() if line.strip().split(" ")[0] in ("prefill", "mixed", "decode")]
    assert {r[0] for r in rows} >= {"prefill", "decode"}
    for r in rows:
        assert float(r[r.index("GB/s") - 1]) > 0 and float(r[r.index("GFLOP/s") - 1]) > 0


def test_step_costs_count_each_weight_once_and_the_embedding_not_at_all(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    model = engine.runner.model
    cfg = model.config
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    costs = StepCosts.of(model, torch.float32)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert costs.weight_bytes == 4 * (sum(m.weight.numel() for m in linears.values()) + norms)
    assert costs.flops_per_token == 2 * sum(m.weight.numel() for n, m in linears.items() if n != "lm_head")
    assert costs.lm_head_flops == 2 * cfg.vocab_size * cfg.hidden_size
    assert costs.kv_bytes_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
