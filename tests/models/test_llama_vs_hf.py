"""lamina's Llama equals transformers' on the same weights, for every variant lamina claims."""
import pytest
import torch

from lamina.models.loader import load_model
from tests.utils import PagedRunner, save_tiny_hf_model

VARIANTS = {
    "llama2_mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "head_dim_explicit": dict(head_dim=32),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "rope_llama3": dict(rope_theta=500000.0, max_position_embeddings=512, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qkv_bias": dict(attention_bias=True),
}


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=list(VARIANTS) + ["qwen2"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen2":
        hf = save_tiny_hf_model(path, arch="qwen2", num_key_value_heads=2)
    else:
        hf = save_tiny_hf_model(path, **VARIANTS[request.param])
    return hf, path


PROMPT = [3, 17, 250, 9, 9, 42, 101, 7, 64, 200, 5, 6, 31, 77, 18, 19, 20, 255, 0, 1, 2, 88, 13, 14, 15]


def test_prefill_logits_match(pair):
    hf, path = pair
    model = load_model(str(path), dtype="float32")
    runner = PagedRunner(model, block_size=16)
    sid = runner.add_sequence()
    ours = runner.step({sid: PROMPT}, all_logits=True)
    ref = _hf_logits(hf, PROMPT)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_token_by_token_decode_matches(pair):
    hf, path = pair
    model = load_model(str(path), dtype="float32")
    runner = PagedRunner(model, block_size=4)  # many block boundaries
    sid = runner.add_sequence()
    runner.step({sid: PROMPT[:5]})
    ref = _hf_logits(hf, PROMPT)
    for i in range(5, len(PROMPT)):
        out = runner.step({sid: [PROMPT[i]]})[0]
        assert (out - ref[i]).abs().max().item() <= 1e-4, f"position {i}"


def test_bfloat16_close(pair):
    hf, path = pair
    model = load_model(str(path), dtype="bfloat16")
    runner = PagedRunner(model)
    sid = runner.add_sequence()
    ours = runner.step({sid: PROMPT}, all_logits=True)
    ref = _hf_logits(hf, PROMPT)
    # bf16 keeps 8 mantissa bits: logits of this tiny model (|x| ~ 1) agree to a few hundredths
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 0.05 * max(1.0, scale)


def test_batched_ragged_sequences_match_single(pair):
    """Two sequences of different lengths in one flat batch give each its own logits."""
    hf, path = pair
    model = load_model(str(path), dtype="float32")
    runner = PagedRunner(model, block_size=16)
    a, b = runner.add_sequence(), runner.add_sequence()
    out = runner.step({a: PROMPT, b: PROMPT[:7]})
    assert (out[0] - _hf_logits(hf, PROMPT)[-1]).abs().max().item() <= 1e-4
    assert (out[1] - _hf_logits(hf, PROMPT[:7])[-1]).abs().max().item() <= 1e-4
    # then one decode step for both together
    out = runner.step({a: [5], b: [6]})
    assert (out[0] - _hf_logits(hf, PROMPT + [5])[-1]).abs().max().item() <= 1e-4
    assert (out[1] - _hf_logits(hf, PROMPT[:7] + [6])[-1]).abs().max().item() <= 1e-4
