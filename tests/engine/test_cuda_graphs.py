"""CUDA graphs of the decode step change speed, not tokens.

The padding to batch-size buckets (persistent buffers, padding rows that must neither store K/V
nor attend, block tables left over from larger batches) is tested everywhere by running it
without capture; the captured graphs themselves need a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lamina.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from lamina.sampling_params import SamplingParams
from tests.engine.agreement import assert_greedy_agree
from tests.engine.test_engine import make_engine, random_prompts, run
from tests.utils import count_step_calls

PARAMS = SamplingParams(max_tokens=16, temperature=0, logprobs=2, ignore_eos=True)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 32]
    sizes = graph_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256
    assert all(b - a == 16 for a, b in zip(sizes[4:], sizes[5:]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_decode_buckets_match_unpadded(tiny_model_dir, backend):
    # 12 prompts admitted one per step, then finishing one per step: pure-decode batches of 12
    # down to 1 sequence; 8 and under go through the buckets (3, 5, 6, 7 padded), larger ones take
    # the plain step; block tables grow to 6 blocks
    prompts = random_prompts(12, seed=4, lo=3, hi=80)
    plain = run(make_engine(tiny_model_dir, attention_backend=backend), prompts, PARAMS, stagger=1)
    engine = make_engine(tiny_model_dir, attention_backend=backend)
    runner = engine.runner
    graphs = DecodeGraphs(runner.model, max_batch=8, max_seq_len=engine.max_model_len,
                          block_size=runner.block_size, device=runner.device, capture=False)
    runner.strategies = [graphs]
    calls = count_step_calls(graphs, "run")
    padded = run(engine, prompts, PARAMS, stagger=1)
    assert calls["sizes"] == set(range(1, 9))
    for a, b in zip(plain, padded):
        assert_greedy_agree(a, b)


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_graphs_match_eager(tiny_model_dir, dtype, monkeypatch):
    monkeypatch.delenv("LAMINA_ENFORCE_EAGER", raising=False)  # graphs are the default on CUDA
    prompts = random_prompts(24, seed=7, lo=3, hi=120)
    eager = run(make_engine(tiny_model_dir, dtype=dtype, enforce_eager=True), prompts, PARAMS, stagger=5)
    engine = make_engine(tiny_model_dir, dtype=dtype, enforce_eager=None, max_num_seqs=20)
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.capture and sorted(graphs.graphs) == [1, 2, 4, 8, 16, 32]
    calls = count_step_calls(graphs, "run")
    captured = run(engine, prompts, PARAMS, stagger=5)
    single = run(engine, prompts[:1], PARAMS)
    assert calls["calls"] > 0 and 1 in calls["sizes"] and max(calls["sizes"]) == 20
    for a, b in zip(eager, captured):
        assert_greedy_agree(a, b)
    assert_greedy_agree(eager[0], single[0])


@needs_cuda
def test_compile_flag_on_cuda_keeps_the_graphs(tiny_model_dir):
    """--compile is ignored on CUDA (Inductor could not build the Triton kernels inside the step):
    the engine still captures its decode graphs."""
    runner = make_engine(tiny_model_dir, enforce_eager=False, max_num_seqs=4).runner
    assert runner.compiled is None and sorted(runner.decode_graphs.graphs) == [1, 2, 4]


@needs_cuda
def test_enforce_eager_captures_nothing(tiny_model_dir):
    assert make_engine(tiny_model_dir, enforce_eager=True).runner.decode_graphs is None


def test_bench_gpu_script_runs(tiny_model_dir, tmp_path):
    """bench/gpu.py (lamina vs transformers on a GPU) end to end on the CPU, on a tiny model."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "gpu.json"
    env = dict(os.environ, LAMINA_ENFORCE_EAGER="1")
    done = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu.py"), "--model-dir", tiny_model_dir,
                           "--device", "cpu", "--quick", "--kv-blocks", "400", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(out.read_text())
    for name in ("lamina", "lamina-eager", "transformers"):
        assert res["single"][name]["decode_tok_s"] > 0 and res["prefill"][name]["tok_s"] > 0
    assert res["offline"]["lamina"]["out_tok_s"] > 0 and res["offline"]["transformers"]["out_tok_s"] > 0
