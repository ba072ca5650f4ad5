"""The Llama family, written out: RMSNorm, RoPE, grouped-query attention over a paged KV cache, SwiGLU.

One config-driven model covers Llama 1/2/3, Mistral-style and Qwen2-style (q/k/v bias) checkpoints.
The forward pass takes a flat batch (the new tokens of many sequences, one after another) plus an
`AttentionMetadata` object that says which rows belong to which sequence and where their K/V go.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.distributed.sharding import Part, Shard
from lamina.kernels import AttentionMetadata, Ops
from lamina.layers.activation import SiluAndMul


def rope_cos_sin_cache(cfg: ModelConfig, max_len: int) -> torch.Tensor:
    """[max_len, head_dim] float32 table: cos of each (position, frequency) then sin."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    original = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
    if kind == "dynamic" and max_len > original:
        # NTK-aware: stretch the base once for the longest context we serve. transformers recomputes
        # it per forward from the current length, which a KV cache cannot follow; within the
        # original context both agree exactly.
        base = base * ((factor * max_len / original) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, factor, scaling, original)
    positions = torch.arange(max_len, dtype=torch.int64, device="cpu").float()
    if kind == "linear":
        positions = positions / factor
    freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, scaling: dict, original: int) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """This rank's heads (all of them without tensor parallelism)."""

    def __init__(self, cfg: ModelConfig, ops: Ops, shard: Shard):
        super().__init__()
        self.num_heads = shard.q_heads(cfg)[1]
        self.num_kv_heads = shard.kv_heads(cfg)[1]
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.ops = ops
        # [num_blocks, block_size, num_kv_heads, head_dim], bound by the engine once it sizes the cache
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rotary_embedding(q, k, positions, cos_sin_cache)
        self.ops.store_kv_cache(k, v, self.k_cache, self.v_cache, md.slot_mapping)
        out = self.ops.paged_attention(q, self.k_cache, self.v_cache, md, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul. Where the
    gate/up layer applies the activation itself (a fused GEMM chosen at load), `act` is an identity.
    With tensor parallelism it holds this rank's channels."""

    def __init__(self, cfg: ModelConfig, ops: Ops, shard: Shard):
        super().__init__()
        channels = shard.channels(cfg)[1]
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * channels, bias=False)
        self.act = SiluAndMul(ops)
        self.down_proj = nn.Linear(channels, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, shard: Shard):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, ops, shard)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops, shard)

    def forward(self, x, residual, positions, cos_sin_cache, md):
        # the residual add is fused into each norm: norm(x + residual) and the new residual
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, cos_sin_cache, md)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """With a `shard` of N > 1 the model holds one rank's part of every weight (sharding.py), at
    its local shapes; layers/parallel.py then puts in the layers that combine the ranks' parts."""

    def __init__(self, cfg: ModelConfig, ops: Ops, max_len: int | None = None, shard: Shard = Shard()):
        super().__init__()
        shard.check(cfg)
        self.config = cfg
        self.shard = shard
        self.num_kv_heads = shard.kv_heads(cfg)[1]     # this rank's: the KV cache's width
        vocab = shard.vocab_rows(cfg)
        # an explicit weight skips nn.Embedding's random init, whose normal_ on the meta device
        # imports torch._dynamo: seconds before a first answer that never compiles anything
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size, _weight=torch.empty(vocab, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, shard) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab, bias=False)
        # not a registered buffer: it is derived from the config, never loaded, and stays float32
        self.cos_sin_cache = rope_cos_sin_cache(cfg, max_len or cfg.max_position_embeddings)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]. Returns float32 logits for the rows in md.logits_indices."""
        return self.compute_logits(*self.hidden_states(input_ids, positions, md), md)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata):
        """The decoder layers over all T rows: (last layer's output, residual stream)."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.cos_sin_cache, md)
        return x, residual

    def compute_logits(self, x: torch.Tensor, residual: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        if md.logits_indices is not None:
            x, residual = x[md.logits_indices], residual[md.logits_indices]
        x, _ = self.norm(x, residual)
        return self.lm_head(x).float()

    def bind_kv_caches(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        for layer, k, v in zip(self.layers, k_caches, v_caches):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k, v

    # -- loading ---------------------------------------------------------------------------------
    # Checkpoint names -> (our parameter, which slice of the fused projection, in order).
    _FUSED = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    @staticmethod
    def _local_name(name: str) -> str | None:
        """A checkpoint tensor's name as the model knows it; None for tensors it has no use for."""
        if name.startswith("model."):
            name = name[len("model."):]
        return None if "rotary_emb" in name else name

    def part_of(self, name: str, shape: tuple[int, ...]) -> Part | None:
        """Which part of checkpoint tensor `name` (of `shape`) this rank loads: all of it unless the
        model is sharded; None when the model has no use for the tensor (read nothing of it)."""
        name = self._local_name(name)
        if name is None or (name == "lm_head.weight" and self.config.tie_word_embeddings):
            return None
        cfg, shard, hd = self.config, self.shard, self.config.head_dim
        parts = name.split(".")
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
        q_heads, kv_heads = shard.q_heads(cfg), shard.kv_heads(cfg)
        # module -> (dimension split, its full size, this rank's (first, count) in units of `unit` rows)
        split = {"q_proj": (0, cfg.num_attention_heads * hd, q_heads, hd),
                 "k_proj": (0, cfg.num_key_value_heads * hd, kv_heads, hd),
                 "v_proj": (0, cfg.num_key_value_heads * hd, kv_heads, hd),
                 "gate_proj": (0, cfg.intermediate_size, shard.channels(cfg), 1),
                 "up_proj": (0, cfg.intermediate_size, shard.channels(cfg), 1),
                 "embed_tokens": (0, cfg.vocab_size, shard.vocab(cfg), 1),
                 "lm_head": (0, cfg.vocab_size, shard.vocab(cfg), 1)}
        if kind == "weight":   # row-parallel: split by input; their biases are whole
            split.update({"o_proj": (1, cfg.num_attention_heads * hd, q_heads, hd),
                          "down_proj": (1, cfg.intermediate_size, shard.channels(cfg), 1)})
        if module in split:
            dim, full, (first, count), unit = split[module]
            if len(shape) <= dim or shape[dim] != full:   # a slice would silently miss or pad rows
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(shape)}, the model expects "
                                 f"{full} along dimension {dim}")
            return Part(dim, first * unit, count * unit)
        return Part(0, 0, shape[0]) if shape else Part(0, 0, 0)   # replicated: norms, o_proj's bias

    def load_weight(self, name: str, tensor: torch.Tensor) -> str | None:
        """Copy one checkpoint tensor (this rank's part of it, as part_of says) into place. Returns
        the parameter name it filled (with the fused slice suffixed), or None when the tensor is
        not part of the model."""
        name = self._local_name(name)
        if name is None or (name == "lm_head.weight" and self.config.tie_word_embeddings):
            return None
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in self._FUSED:
            fused, index = self._FUSED[parts[-2]]
            target = self.get_parameter(".".join(parts[:-2] + [fused, parts[-1]]))
            sizes = self._fused_sizes(fused)
            start = sum(sizes[:index])
            dst = target.data.narrow(0, start, sizes[index])
            filled = f"{'.'.join(parts[:-2])}.{fused}.{parts[-1]}[{index}]"
        else:
            try:
                dst = self.get_parameter(name).data
            except AttributeError:
                return None
            filled = name
            if parts[0] in ("embed_tokens", "lm_head"):
                # the last ranks' vocabulary rows past the end are padding: zeros, never sampled
                dst[tensor.shape[0]:].zero_()
                dst = dst[:tensor.shape[0]]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(dst.shape)}")
        dst.copy_(tensor)
        return filled

    def _fused_sizes(self, fused: str) -> list[int]:
        cfg, shard = self.config, self.shard
        if fused == "qkv_proj":
            return [shard.q_heads(cfg)[1] * cfg.head_dim] + [shard.kv_heads(cfg)[1] * cfg.head_dim] * 2
        return [shard.channels(cfg)[1]] * 2

    def expected_weights(self) -> set[str]:
        """Every name load_weight must fill for the model to be complete."""
        names = set()
        for pname, _ in self.named_parameters():
            if pname == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            fused = pname.split(".")[-2]
            if fused in ("qkv_proj", "gate_up_proj"):
                count = 3 if fused == "qkv_proj" else 2
                names.update(f"{pname}[{i}]" for i in range(count))
            else:
                names.add(pname)
        return names
