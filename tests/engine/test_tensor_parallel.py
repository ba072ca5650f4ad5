"""Tensor parallelism over gloo with real processes: TP=N gives TP=1's tokens and logits.

Each TP engine here is rank 0 in the test process plus workers lamina starts (one thread each).
"""
from __future__ import annotations

import pytest
import torch

from lamina import LLM, SamplingParams
from lamina.kernels import AttentionMetadata
from tests.engine.agreement import assert_greedy_agree
from tests.utils import save_tiny_hf_model

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(30, 70))]
ENGINE = dict(dtype="float32", num_threads=1, kv_cache_memory=1 << 24, max_model_len=256)

VARIANTS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa_replicated_kv": dict(num_attention_heads=4, num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "qkv_bias": dict(attention_bias=True),     # Llama's also biases o_proj: added once, after the sum
    "odd_vocab": dict(vocab_size=263),          # the last rank's vocabulary rows are padding
}


def all_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """Every row's logits of one prefill of `prompt`, in free KV blocks (the runner's own forward:
    with TP it broadcasts the step to the workers like any other)."""
    runner = llm.engine.runner
    n, bs = len(prompt), runner.block_size
    blocks = torch.arange(-(-n // bs), dtype=torch.int32)
    md = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=blocks[None], slot_mapping=torch.arange(n, dtype=torch.int64),
        max_query_len=n, max_seq_len=n, logits_indices=torch.arange(n))
    return runner.forward(torch.tensor(prompt), torch.arange(n), md).clone()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_matches_tp1(tmp_path, variant):
    save_tiny_hf_model(tmp_path, **VARIANTS[variant])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    one = LLM(str(tmp_path), **ENGINE)
    expected = [o.outputs[0].token_ids for o in one.generate(PROMPTS, params, use_tqdm=False)]
    ref = all_logits(one, PROMPTS[2])
    two = LLM(str(tmp_path), tensor_parallel_size=2, **ENGINE)
    try:
        got = [o.outputs[0].token_ids for o in two.generate(PROMPTS, params, use_tqdm=False)]
        logits = all_logits(two, PROMPTS[2])
    finally:
        two.shutdown()
    assert got == expected
    assert logits.shape == ref.shape == (len(PROMPTS[2]), VARIANTS[variant].get("vocab_size", 264))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_tp2_engine_features(tmp_path):
    """Prefix caching, chunked prefill, preemption, seeded sampling and logprobs with TP=2, against TP=1
    on the same settings."""
    save_tiny_hf_model(tmp_path)
    # 8 blocks of 16 tokens cannot hold the four long sequences at once: some are preempted
    engine = dict(ENGINE, max_num_batched_tokens=24, num_kv_blocks=8, block_size=16)
    shared = list(range(40, 80))
    prompts = [shared + [1, 2], shared + [3, 4], list(range(100, 140)), list(range(150, 190))]
    # prompt logprobs turn prefix caching off for their request: only the unshared prompts ask for them
    params = [SamplingParams(max_tokens=16, temperature=0.9, seed=7 + i, ignore_eos=True, logprobs=3,
                             prompt_logprobs=2 if i >= 2 else None) for i in range(len(prompts))]

    def run(llm: LLM):
        first = llm.generate(prompts[:1], params[:1], use_tqdm=False)   # fills the prefix cache
        rest = llm.generate(prompts[1:], params[1:], use_tqdm=False)
        return first + rest, llm.engine.stats

    one, stats_one = run(LLM(str(tmp_path), **engine))
    two_llm = LLM(str(tmp_path), tensor_parallel_size=2, **engine)
    try:
        two, stats_two = run(two_llm)
    finally:
        two_llm.shutdown()
    assert stats_two.num_preemptions_total > 0 and stats_two.prefix_cache_hits_total > 0
    assert two[1].num_cached_tokens > 0
    for a, b in zip(one, two):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids      # seeded sampling on rank 0, same logits
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert [t for t, _ in la.top] == [t for t, _ in lb.top]
            assert max(abs(x - y) for (_, x), (_, y) in zip(la.top, lb.top)) < 1e-4
        pa = [p for p in a.prompt_logprobs or [] if p is not None]
        pb = [p for p in b.prompt_logprobs or [] if p is not None]
        assert len(pa) == len(pb) and all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(pa, pb))


def test_tp2_structured_outputs_and_speculative_decoding(tmp_path):
    """A grammar-constrained request and n-gram speculation (verification steps of k+1 query tokens
    broadcast like any other) give TP=1's tokens with TP=2."""
    save_tiny_hf_model(tmp_path)
    looping = [(list(range(9, 14)) * 5)[:23], ([3, 1, 4, 1, 5] * 6)[:27]]
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)] * 2 + [
        SamplingParams(max_tokens=40, temperature=0.8, seed=3, structured_outputs={"regex": "[a-e]{3}-[0-9]{2}"})]
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    one = LLM(str(tmp_path), **ENGINE).generate(looping + [PROMPTS[0]], params, use_tqdm=False)
    two_llm = LLM(str(tmp_path), tensor_parallel_size=2, speculative_config=spec, **ENGINE)
    try:
        two = two_llm.generate(looping + [PROMPTS[0]], params, use_tqdm=False)
        assert two_llm.engine.stats.spec_num_accepted_tokens_total > 0
    finally:
        two_llm.shutdown()
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]
    assert two[2].outputs[0].finish_reason == "stop" and len(two[2].outputs[0].text) == 6


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_tp2_quantized_shards(tmp_path, quantization):
    """Each rank quantizes its own shard, into a slice of TP=1's quantized weights: int4's groups of
    32 inputs fall the same way, and int8's row-parallel shards take each output channel's scale
    from the whole row (a max over the ranks at load)."""
    save_tiny_hf_model(tmp_path)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    one = LLM(str(tmp_path), quantization=quantization, **ENGINE)
    expected, ref = one.generate(PROMPTS, params, use_tqdm=False), all_logits(one, PROMPTS[2])
    two = LLM(str(tmp_path), quantization=quantization, tensor_parallel_size=2, **ENGINE)
    try:
        assert type(two.engine.runner.model.layers[0].mlp.down_proj.inner).__name__ == quantization.capitalize() + "Linear"
        got, logits = two.generate(PROMPTS, params, use_tqdm=False), all_logits(two, PROMPTS[2])
    finally:
        two.shutdown()
    for a, b in zip(expected, got):
        assert_greedy_agree(a, b)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_workers_stop_with_the_llm(tmp_path):
    """Garbage collection of an LLM stops its workers; so does llm.shutdown() (the other tests)."""
    import gc
    save_tiny_hf_model(tmp_path)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, **ENGINE)
    worker = llm.engine.workers.processes[0]
    assert worker.poll() is None
    del llm
    gc.collect()
    assert worker.wait(15) == 0


def test_killed_worker_fails_generate_and_a_new_llm_starts(tmp_path):
    """In the library: a worker killed between calls makes the next generate raise (never hang), and
    the process can start a new tensor-parallel LLM after."""
    import os
    import signal
    from lamina.engine.errors import ParallelFailure
    save_tiny_hf_model(tmp_path)
    params = SamplingParams(max_tokens=4, temperature=0)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, **ENGINE)
    worker = llm.engine.workers.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    with pytest.raises(ParallelFailure):
        llm.generate(PROMPTS[0], params, use_tqdm=False)
    llm.shutdown()
    again = LLM(str(tmp_path), tensor_parallel_size=2, **ENGINE)
    try:
        assert len(again.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    finally:
        again.shutdown()


def test_a_worker_that_cannot_start_fails_the_start(tmp_path, monkeypatch):
    """Rank 0 does not wait for a worker that exited before joining (here its interpreter fails)."""
    import sys
    import time
    save_tiny_hf_model(tmp_path)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="worker rank 1 exited with code 1 before joining"):
        LLM(str(tmp_path), tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - start < 30


def test_tp_head_counts_must_divide(tmp_path):
    save_tiny_hf_model(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="must divide the model's 4 query heads"):
        LLM(str(tmp_path), tensor_parallel_size=3, **ENGINE)


@pytest.mark.slow
def test_default_model_tp3_agrees_with_tp1(default_model_dir):
    """The default model (9 query heads, 3 KV heads) split three ways, at its default dtype."""
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=2, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    engine = dict(num_threads=1, kv_cache_memory=64 << 20, max_model_len=512)
    one = LLM(default_model_dir, **engine).generate(prompts, params, use_tqdm=False)
    three = LLM(default_model_dir, tensor_parallel_size=3, **engine)
    try:
        got = three.generate(prompts, params, use_tqdm=False)
    finally:
        three.shutdown()
    for a, b in zip(one, got):
        assert_greedy_agree(a, b)


@pytest.mark.slow
def test_torchrun_two_nodes_on_loopback(tmp_path):
    """Two torchrun invocations, one rank each, as two nodes would run them: `lamina generate -tp 2`
    prints what TP=1 prints."""
    import os
    import socket
    import subprocess
    import sys
    save_tiny_hf_model(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["-m", "lamina", "generate", "--model", str(tmp_path), "--dtype", "float32", "--num-threads", "1",
            "--temperature", "0", "--max-tokens", "8", "--enforce-eager", "--kv-cache-memory", "16MiB", "hello"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}
    expected = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)
    assert expected.returncode == 0, expected.stderr

    def node(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), *args, "-tp", "2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nodes = [node(1), node(0)]
    try:
        outs = [p.communicate(timeout=180) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], outs
    assert outs[1][0] == expected.stdout and expected.stdout.strip()


@pytest.mark.slow
def test_tp2_compiled_steps(tmp_path):
    """torch.compile on CPU with TP=2: every rank compiles its decode step before serving (the
    collectives traced into the graph), and decoding through it gives TP=1's eager tokens."""
    from tests.utils import count_step_calls
    save_tiny_hf_model(tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(str(tmp_path), **ENGINE).generate(PROMPTS[:2], params, use_tqdm=False)]
    two = LLM(str(tmp_path), tensor_parallel_size=2, enforce_eager=False, **ENGINE)
    try:
        compiled = two.engine.runner.compiled
        assert compiled.status == "ready"
        calls = count_step_calls(compiled, "decode")
        got = [o.outputs[0].token_ids for o in two.generate(PROMPTS[:2], params, use_tqdm=False)]
    finally:
        two.shutdown()
    assert calls["calls"] > 0
    assert got == expected
