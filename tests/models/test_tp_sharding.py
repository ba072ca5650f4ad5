"""TP=8 sharding in one process, over torch's fake process group: every rank's shard has the shapes
and values of its slice of the checkpoint, and the loader reads that slice and nothing more."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.testing._internal.distributed.fake_pg import FakeStore

from lamina.distributed.group import ParallelContext
from lamina.distributed.sharding import Shard
from lamina.kernels import AttentionMetadata
from lamina.kernels.dispatch import KernelPlan
from lamina.layers import build_linears
from lamina.layers.parallel import GatheredLogits, RowParallel, VocabParallelEmbedding
from lamina.models.loader import load_model, safetensors_files
from tests.utils import save_tiny_hf_model

N = 8
# 8 query heads over 8 ranks, 2 KV heads replicated 4 ways; 128 MLP channels; 264 vocabulary rows
SHAPE = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128,
             vocab_size=264, attention_bias=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp8")
    save_tiny_hf_model(path, **SHAPE)
    with safe_open(safetensors_files(str(path))[0], framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return str(path), tensors


@pytest.fixture
def fake_group():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=N)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_tp8_shard_shapes_values_and_bytes_read(checkpoint, fake_group):
    path, full = checkpoint
    d, hd = 64, 8
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    for rank in range(N):
        model = load_model(path, "float32", shard=Shard(rank, N))
        kv = rank * 2 // N                       # the KV head this rank's query head reads
        attn = model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads, model.num_kv_heads) == (1, 1, 1)
        assert attn.qkv_proj.weight.shape == (3 * hd, d) and attn.qkv_proj.bias.shape == (3 * hd,)
        assert attn.o_proj.weight.shape == (d, hd) and attn.o_proj.bias.shape == (d,)
        mlp = model.layers[0].mlp
        assert mlp.gate_up_proj.weight.shape == (2 * 16, d) and mlp.down_proj.weight.shape == (d, 16)
        assert model.embed_tokens.weight.shape == model.lm_head.weight.shape == (33, d)
        # the values are this rank's slice
        p = "model.layers.0."
        q, k, v = attn.qkv_proj.weight.split(hd)
        assert torch.equal(q, full[p + "self_attn.q_proj.weight"][rank * hd:(rank + 1) * hd])
        assert torch.equal(k, full[p + "self_attn.k_proj.weight"][kv * hd:(kv + 1) * hd])
        assert torch.equal(v, full[p + "self_attn.v_proj.weight"][kv * hd:(kv + 1) * hd])
        assert torch.equal(attn.o_proj.weight, full[p + "self_attn.o_proj.weight"][:, rank * hd:(rank + 1) * hd])
        assert torch.equal(attn.o_proj.bias, full[p + "self_attn.o_proj.bias"])
        gate, up = mlp.gate_up_proj.weight.split(16)
        assert torch.equal(up, full[p + "mlp.up_proj.weight"][rank * 16:(rank + 1) * 16])
        assert torch.equal(mlp.down_proj.weight, full[p + "mlp.down_proj.weight"][:, rank * 16:(rank + 1) * 16])
        assert torch.equal(model.lm_head.weight, full["lm_head.weight"][rank * 33:(rank + 1) * 33])
        # it read exactly what it holds (no padding here), a fraction of the file
        held = sum(t.numel() * t.element_size() for t in model.parameters())
        assert model.bytes_read == held < full_bytes / 3


def test_tp8_parallel_layers_and_int8_shards(checkpoint, fake_group):
    """build_linears puts the parallel layers around whatever serves each projection (int8 here, per
    rank's shard), and a step runs through them (the fake group's collectives return garbage; the
    shapes are what is checked)."""
    path, _ = checkpoint
    parallel = ParallelContext(3, N, torch.device("cpu"), fake_group)
    model = load_model(path, "float32", shard=parallel.shard)
    build_linears(model, "int8", KernelPlan(), torch.device("cpu"), parallel)
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    assert isinstance(attn.o_proj, RowParallel) and isinstance(mlp.down_proj, RowParallel)
    assert type(attn.o_proj.inner).__name__ == "Int8Linear" and attn.o_proj.inner.in_features == 8
    assert attn.o_proj.bias is not None and attn.o_proj.inner.bias is None
    assert type(attn.qkv_proj).__name__ == "Int8Linear" and attn.qkv_proj.out_features == 24
    assert isinstance(model.embed_tokens, VocabParallelEmbedding) and model.embed_tokens.first == 99
    assert isinstance(model.lm_head, GatheredLogits)
    caches = [torch.zeros(4, 16, 1, 8) for _ in range(2)]
    model.bind_kv_caches(caches, [torch.zeros_like(c) for c in caches])
    md = AttentionMetadata(query_start_loc=torch.tensor([0, 5], dtype=torch.int32),
                           seq_lens=torch.tensor([5], dtype=torch.int32), block_tables=torch.tensor([[0]], dtype=torch.int32),
                           slot_mapping=torch.arange(5), max_query_len=5, max_seq_len=5, logits_indices=torch.tensor([4]))
    with torch.inference_mode():
        assert model(torch.arange(5), torch.arange(5), md).shape == (1, 264)


@pytest.mark.parametrize("heads,kv_heads,n,message", [
    (9, 3, 2, "must divide the model's 9 query heads"),
    (8, 4, 8, None),                            # 4 KV heads replicated twice
    (12, 4, 6, "replicated, which needs a multiple of 4"),
    (8, 4, 2, None),
])
def test_head_count_rules(heads, kv_heads, n, message):
    from lamina.config import ModelConfig
    cfg = ModelConfig(vocab_size=10, hidden_size=heads * 4, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=4)
    if message is None:
        Shard(0, n).check(cfg)
    else:
        with pytest.raises(ValueError, match=message):
            Shard(0, n).check(cfg)


def test_a_tensor_of_the_wrong_size_is_refused_not_sliced(tmp_path):
    """A slice of a tensor larger or smaller than the config says would load without complaint:
    the loader checks the whole tensor's size first."""
    import json

    from lamina.config import ModelLoadError
    save_tiny_hf_model(tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["vocab_size"] = 300
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ModelLoadError, match="the model expects 300 along dimension 0"):
        load_model(str(tmp_path), "float32", shard=Shard(1, 2))
