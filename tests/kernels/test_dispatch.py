"""Measured dispatch (kernels/dispatch.py, engine/autotune.py): the choice per op and shape class,
its cache (keyed by what the timings depend on, invalidated when any of it changes), the
environment's overrides, and a working choice wherever a kernel is switched off or missing."""
import json
import logging
import os

import pytest
import torch
from torch import nn

from lamina import LLM, SamplingParams
from lamina.config import ModelConfig
from lamina.engine.autotune import plan_for
from lamina.kernels import dispatch
from lamina.cpu_features import amx
from lamina.kernels.dispatch import AttentionPlan, KernelPlan, RowPlan
from lamina.layers import build_linears, linear_choices
from lamina.layers.linear import Bf16Linear, Bf16SwiGLU
from lamina.layers.quant import Int4Linear, Int8Linear
from tests.engine.agreement import assert_greedy_agree
from tests.utils import TINY

CFG = ModelConfig(head_dim=16, **TINY)
CPU = torch.device("cpu")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $LAMINA_HOME for the dispatch cache (the kernels stay built where they are)."""
    from lamina.kernels import cpu_build
    cpu_build.load()              # built (or found) under the real home first
    monkeypatch.setenv("LAMINA_HOME", str(tmp_path))
    monkeypatch.delenv("LAMINA_DISPATCH", raising=False)
    monkeypatch.delenv("LAMINA_AUTOTUNE", raising=False)
    # these tests are about the cache, not the machine's load (their own busy-machine test below)
    monkeypatch.setattr(dispatch, "BUSY_FRACTION", 1.01)
    return tmp_path


def test_row_plan_picks_by_class():
    plan = RowPlan("lamina", "torch", "dequant")
    assert [plan.pick(r) for r in (1, 16, 17, 256, 257, 4096)] == ["lamina"] * 2 + ["torch"] * 2 + ["dequant"] * 2
    assert RowPlan("torch", "torch", "torch").pick(10 ** 6) == "torch"
    assert str(RowPlan("a", "a", "a")) == "a" and "prefill dequant" in str(plan)
    assert plan.uses("torch") and not plan.uses("x")


def test_row_plan_compares_rows_only_where_the_choice_changes():
    """Under torch.compile each comparison in pick() is a guard; the compiled steps build one graph
    per range between row_boundaries(), so pick() must compare nowhere else. int8's default plan
    (lamina, lamina, dequant) changes only past 256 rows: batches of 2 to 256 share one graph."""
    plan = RowPlan("lamina", "lamina", "dequant")
    assert KernelPlan(((("int8_linear", 32, 32), plan),)).row_boundaries() == (256,)
    f = torch.compile(lambda x: x * (2 if plan.pick(x.shape[0]) == "lamina" else 3), backend="eager")
    for rows in (2, 17, 100, 256):
        x = torch.ones(rows, 4)
        torch._dynamo.mark_dynamic(x, 0)
        with torch._dynamo.config.patch(error_on_recompile=rows > 2):
            assert f(x)[0, 0].item() == 2
    x = torch.ones(300, 4)
    torch._dynamo.mark_dynamic(x, 0)
    assert f(x)[0, 0].item() == 3         # past the boundary: a graph of its own


def test_choose_keeps_the_default_within_the_margin():
    assert dispatch.choose({"lamina": 1.04, "torch": 1.0}, "lamina") == "lamina"
    assert dispatch.choose({"lamina": 1.2, "torch": 1.0}, "lamina") == "torch"
    assert dispatch.choose({"lamina": 1.0, "torch": 3.0}, "torch") == "lamina"


def test_overrides_are_checked_and_applied():
    entries = dispatch.parse_overrides("bf16_linear.prefill=torch, attention=torch")
    assert dispatch.apply_overrides("bf16_linear", RowPlan("lamina", "lamina", "lamina"), entries) == \
        RowPlan("lamina", "lamina", "torch")
    assert dispatch.apply_overrides("attention", AttentionPlan(), entries) == AttentionPlan("torch", "torch")
    assert dispatch.apply_overrides("int8_linear", RowPlan("a", "b", "c"), entries) == RowPlan("a", "b", "c")
    for bad in ("bf16_linear=fast", "gemm=torch", "bf16_linear.huge=torch", "int4_linear=torch"):
        with pytest.raises(ValueError, match="LAMINA_DISPATCH"):
            dispatch.parse_overrides(bad)


def test_timing_interleaves_and_drops_the_clearly_slower():
    calls = {"fast": 0, "slow": 0}

    def run(name, seconds):
        def call():
            calls[name] += 1
            end = __import__("time").perf_counter() + seconds
            while __import__("time").perf_counter() < end:
                pass
        return call
    times = dispatch.time_impls({"fast": [run("fast", 0.001)], "slow": [run("slow", 0.01)]}, rounds=5)
    assert times["fast"] < times["slow"] / 3
    assert calls == {"fast": 6, "slow": 2}      # warm-up and round 0 only for the slow one


@pytest.mark.usefixtures("cpu_kernels")
def test_plan_is_measured_once_then_cached(home, caplog):
    with caplog.at_level(logging.INFO, logger="lamina.engine"):
        first = plan_for(CFG, torch.bfloat16, torch.bfloat16, None, "cpu", CPU)
    assert "measuring which kernels" in caplog.text and first.source.startswith("measured")
    path = dispatch.cache_path()
    entries = json.loads(path.read_text())["entries"]
    ops = {c.op for c in linear_choices(_meta_model(torch.bfloat16), None, CPU)}
    assert ops == {"bf16_linear", "bf16_swiglu"}
    # every distinct projection shape, and attention on the model's heads, with both implementations timed
    assert {name.split()[0] for name in entries} == ops | {"attention"}
    for name, classes in entries.items():
        assert all(set(times) == {"lamina", "torch"} and min(times.values()) > 0 for times in classes.values()), name
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lamina.engine"):
        second = plan_for(CFG, torch.bfloat16, torch.bfloat16, None, "cpu", CPU)
    assert "measuring" not in caplog.text and second.source == "cached"
    assert second.linears == first.linears and second.attention == first.attention
    # the choices are those the timings say; a shape only torch can serve (the lm_head: 264 outputs,
    # no whole blocks of 16) is not timed
    for (op, n, k), plan in second.linears:
        if n % 16:
            assert f"{op} {n}x{k}" not in entries and plan == RowPlan("torch", "torch", "torch")
        else:
            assert plan.decode == dispatch.choose(entries[f"{op} {n}x{k}"]["decode"], "lamina")


@pytest.mark.usefixtures("cpu_kernels")
def test_cache_is_keyed_by_what_the_timings_depend_on(home, monkeypatch, caplog):
    plan_for(CFG, torch.bfloat16, torch.bfloat16, None, "cpu", CPU)
    first = dispatch.cache_path()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        assert dispatch.cache_path() != first
    finally:
        torch.set_num_threads(threads)
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "9.9.9")
        assert dispatch.cache_path() != first
        assert plan_for(CFG, torch.bfloat16, torch.bfloat16, None, "cpu", CPU).source.startswith("measured")
    assert dispatch.cache_path() == first and plan_for(CFG, torch.bfloat16, torch.bfloat16, None, "cpu", CPU).source == "cached"
    # a corrupt cache is measured again and rewritten, with a warning
    first.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="lamina.kernels"):
        assert plan_for(CFG, torch.bfloat16, torch.bfloat16, None, "cpu", CPU).source.startswith("measured")
    assert "ignoring the kernel dispatch cache" in caplog.text
    assert json.loads(first.read_text())["entries"]


def test_without_the_kernels_every_layer_gets_a_working_implementation(home, monkeypatch):
    """The C++ kernels switched off (as where they fail to build): nothing offers "lamina", the plan
    holds only what can run, and a quantized and a bf16 model both compute."""
    monkeypatch.setenv("LAMINA_CPU_KERNELS", "0")
    for quantization in (None, "int8", "int4"):
        plan = plan_for(CFG, torch.bfloat16, torch.bfloat16, quantization, "torch", CPU)
        assert all(not p.uses("lamina") for _, p in plan.linears), plan
        model = _model(torch.bfloat16)
        x = torch.randn(5, CFG.hidden_size).to(torch.bfloat16)
        ref = model.lm_head(x).float()
        build_linears(model, quantization, plan, CPU)
        assert not any(getattr(m, "use_kernel", False) for m in model.modules())
        if quantization is None:    # torch's matmul everywhere: the plain nn.Linear stays
            assert not any(isinstance(m, (Bf16Linear, Bf16SwiGLU)) for m in model.modules())
        torch.testing.assert_close(model.lm_head(x).float(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


def test_an_override_that_cannot_run_here_is_an_error(home, monkeypatch):
    monkeypatch.setenv("LAMINA_CPU_KERNELS", "0")
    monkeypatch.setenv("LAMINA_DISPATCH", "int8_linear=lamina")
    plan = plan_for(CFG, torch.bfloat16, torch.bfloat16, "int8", "torch", CPU)
    with pytest.raises(ValueError, match="cannot run 'lamina'.*LAMINA_DISPATCH"):
        build_linears(_model(torch.bfloat16), "int8", plan, CPU)


@pytest.mark.usefixtures("cpu_kernels")
def test_overrides_and_no_autotune(home, monkeypatch):
    monkeypatch.setenv("LAMINA_AUTOTUNE", "0")
    plan = plan_for(CFG, torch.bfloat16, torch.bfloat16, "int8", "cpu", CPU)
    assert plan.source.startswith("defaults") and not dispatch.cache_path().exists()
    # the lm_head (264 outputs: no whole blocks of 16) has torch's int8 GEMV for decode rows instead
    assert all(p == (RowPlan("lamina", "lamina", "dequant") if n % 16 == 0 else RowPlan("torch", "dequant", "dequant"))
               for (_, n, _), p in plan.linears)
    monkeypatch.setenv("LAMINA_DISPATCH", "int8_linear.decode=torch,attention.prefill=torch")
    plan = plan_for(CFG, torch.bfloat16, torch.bfloat16, "int8", "cpu", CPU)
    assert all(p.decode == "torch" and p.prefill == "dequant" for _, p in plan.linears)
    assert plan.attention == AttentionPlan("lamina", "torch") and "LAMINA_DISPATCH" in plan.source
    model = _model(torch.bfloat16)
    build_linears(model, "int8", plan, CPU)
    layer = model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, Int8Linear) and hasattr(layer, "packed") and hasattr(layer, "weight")


@pytest.mark.usefixtures("cpu_kernels")
def test_each_implementation_of_a_layer_computes_the_same_product():
    """Whatever the dispatch picks, a layer computes the same thing: every implementation of each
    op against a float32 product of the weights it holds (torch's bf16 matmul on AMX where granted)."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 192, bias=False).to(torch.bfloat16)
    x = torch.randn(300, 128).to(torch.bfloat16)
    cases = [(Bf16Linear(linear, RowPlan("lamina", "torch", "torch")), linear.weight.float()),
             (Int8Linear(linear, RowPlan("lamina", "torch", "dequant")), None),
             (Int4Linear(linear, RowPlan("lamina", "dequant", "dequant")), None)]
    for layer, w in cases:
        if w is None:
            w = (layer.int8_weight().float() * layer.scale[:, None]) if isinstance(layer, Int8Linear) \
                else layer.dequantize(torch.float32)
        ref = x.float() @ w.T
        for impl in dict.fromkeys(vars(layer.plan).values()):
            for rows in (1, 7, 300):
                torch.testing.assert_close(layer.run(impl, x[:rows]).float(), ref[:rows], rtol=0.02,
                                           atol=0.02 * ref.abs().max().item(), msg=f"{layer.op} {impl} {rows}")
    swiglu_linear = nn.Linear(128, 128, bias=False).to(torch.bfloat16)
    swiglu = Bf16SwiGLU(swiglu_linear, RowPlan("lamina", "torch", "torch"))
    gate, up = (x.float() @ swiglu_linear.weight.float().T).chunk(2, -1)
    ref = nn.functional.silu(gate) * up
    for impl in ("lamina", "torch"):
        torch.testing.assert_close(swiglu.run(impl, x).float(), ref, rtol=0.03, atol=0.03 * ref.abs().max().item())


def test_amx_is_asked_of_the_kernel():
    status = amx()
    assert status is amx()          # asked once per process
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if "amx_tile" not in flags:
        assert not status.granted and "no AMX" in status.reason or "x86-64 Linux only" in status.reason
    elif not status.granted:
        pytest.skip(f"this CPU has AMX but the OS refused it: {status.reason}")
    else:
        assert "granted" in status.reason


@pytest.mark.usefixtures("cpu_kernels")
def test_engine_reports_its_plan_and_agrees_with_torchs_matmul(default_model_dir, home, monkeypatch, caplog):
    """The same greedy answers whether lamina's GEMMs or torch's serve every bf16 projection, and
    the start-up log says which did."""
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    outputs = {}
    for dispatch_env in ("bf16_linear=lamina,bf16_swiglu=lamina", "bf16_linear=torch,bf16_swiglu=torch"):
        monkeypatch.setenv("LAMINA_DISPATCH", dispatch_env)
        with caplog.at_level(logging.INFO, logger="lamina.engine"):
            llm = LLM(default_model_dir, enforce_eager=True, kv_cache_memory=64 << 20)
        impl = dispatch_env.rpartition("=")[2]
        assert f"kernels bf16_linear {impl}; bf16_swiglu {impl}" in caplog.text
        kinds = {type(m) for m in llm.engine.runner.model.modules()}
        assert (Bf16Linear in kinds) == (impl == "lamina")
        outputs[impl] = llm.generate(prompts, params, use_tqdm=False)
        caplog.clear()
    for a, b in zip(outputs["lamina"], outputs["torch"]):
        assert_greedy_agree(a, b)


def _meta_model(dtype):
    from lamina.kernels import reference
    from lamina.models.llama import LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(CFG, reference).to(dtype)


def _model(dtype):
    from lamina.kernels import reference
    from lamina.models.llama import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(CFG, reference).to(dtype)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


@pytest.mark.usefixtures("cpu_kernels")
def test_a_measurement_on_a_busy_machine_is_not_cached(home, caplog, monkeypatch):
    """Timings taken while another process keeps the CPUs busy are not this machine's: they serve
    the run that took them, and the next start measures again."""
    import subprocess
    monkeypatch.setattr(dispatch, "BUSY_FRACTION", 0.15)
    import sys
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        with caplog.at_level(logging.WARNING, logger="lamina.engine"):
            plan = plan_for(CFG, torch.bfloat16, torch.bfloat16, None, "cpu", CPU)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert "not cached" in plan.source and "other processes used" in caplog.text
    assert not dispatch.cache_path().exists()
    assert plan.linears        # the run still got a plan


@pytest.mark.usefixtures("cpu_kernels")
def test_an_incomplete_cache_entry_is_measured_again(home):
    plan_for(CFG, torch.bfloat16, torch.bfloat16, None, "cpu", CPU)
    path = dispatch.cache_path()
    data = json.loads(path.read_text())
    name = next(n for n in data["entries"] if n.startswith("bf16_swiglu"))
    del data["entries"][name]["prefill"]          # e.g. measured for a projection that never saw prefill rows
    data["entries"][next(iter(data["entries"]))]["decode"] = "garbage"
    path.write_text(json.dumps(data))
    assert plan_for(CFG, torch.bfloat16, torch.bfloat16, None, "cpu", CPU).source.startswith("measured")
    assert "prefill" in json.loads(path.read_text())["entries"][name]


@pytest.mark.usefixtures("cpu_kernels")
def test_a_cache_that_cannot_be_written_costs_only_the_next_measurement(tmp_path, monkeypatch, caplog):
    from lamina.kernels import cpu_build
    cpu_build.load()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("LAMINA_HOME", str(blocker))       # $LAMINA_HOME/kernels cannot be made
    monkeypatch.delenv("LAMINA_DISPATCH", raising=False)
    monkeypatch.delenv("LAMINA_AUTOTUNE", raising=False)
    monkeypatch.setattr(dispatch, "BUSY_FRACTION", 1.01)
    with caplog.at_level(logging.WARNING, logger="lamina.kernels"):
        plan = plan_for(CFG, torch.bfloat16, torch.bfloat16, None, "cpu", CPU)
    assert plan.source.startswith("measured") and plan.linears
    assert "could not keep the kernel timings" in caplog.text


def test_weight_copies_stream_from_memory_without_multiplying_a_large_model():
    assert dispatch.copies_for(1 << 20, 1) == 32                 # 32 MiB of copies of a 1 MiB weight: past L2/L3
    assert dispatch.copies_for(8 << 20, 1) == dispatch.STREAM_BYTES // (8 << 20)
    assert dispatch.copies_for(1 << 20, 512) == 2                # compute-bound rows: two are enough
    assert dispatch.copies_for(1 << 30, 1) == dispatch.copies_for(1 << 30, 512) == 1   # an 8B model's lm_head: one
