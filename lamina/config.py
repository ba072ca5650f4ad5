"""Plain dataclasses for the model's shape (from a Hugging Face config.json) and the engine's knobs."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"   # a registry name (lamina/registry.py)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ModelLoadError(ValueError):
    """A model could not be loaded: the message names what is missing or unsupported."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False              # biases on q/k/v
    o_proj_bias: bool = False                 # Llama's attention_bias also covers o_proj; Qwen2's does not
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    architecture: str = "LlamaForCausalLM"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch!r}; lamina runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise ModelLoadError(f"config.json is missing {key!r}")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        # transformers 5 moved rope settings into `rope_parameters`
        params = cfg.get("rope_parameters")
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind in (None, "default"):
                rope_scaling = None
            elif kind not in ("linear", "dynamic", "llama3"):
                raise ModelLoadError(f"unsupported rope_scaling type {kind!r} (supported: linear, dynamic, llama3)")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta if rope_theta is not None else 10000.0,
            rope_scaling=rope_scaling,
            # Qwen2 checkpoints have q/k/v biases but do not say so in config.json
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            o_proj_bias=bool(cfg.get("attention_bias", False)) and arch != "Qwen2ForCausalLM",
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype") or "float32",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=[eos] if isinstance(eos, int) else list(eos or []),
            architecture=arch,
        )

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise ModelLoadError(f"no config.json in {path}")
        with open(cfg_path) as f:
            return cls.from_hf(json.load(f))


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"                       # auto | float32 | bfloat16 | float16
    device: str | None = None                 # None: cuda if available, else cpu
    quantization: str | None = None           # None | int8 (per output channel) | int4 (groups of 32), weight-only
    max_model_len: int | None = None          # None: the model's max_position_embeddings
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int | None = None        # KV budget in bytes; None: 4 GiB on CPU, on CUDA what gpu_memory_utilization leaves
    kv_cache_dtype: str = "auto"              # auto: the model's (float32 with the torch backend on CPU)
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None          # a fixed number of KV-cache blocks on any device (overrides kv_cache_memory)
    enable_prefix_caching: bool = True
    attention_backend: str | None = None      # None: $LAMINA_ATTENTION_BACKEND, else triton on cuda; cpu (C++) or torch on cpu
    enforce_eager: bool | None = None         # None: compile decode steps on CPU, CUDA graphs on GPU ($LAMINA_ENFORCE_EAGER=1: neither)
    num_threads: int | None = None            # torch intra-op threads on CPU (per rank with tensor parallelism)
    tensor_parallel_size: int = 1             # ranks the model is split over (lamina/distributed)
    # a request's tokens and logprobs bitwise independent of what else shares its steps (None:
    # $LAMINA_BATCH_INVARIANT); slower: one kernel per op for every batch, eager steps
    batch_invariant: bool | None = None
    seed: int = 0
    log_stats_interval: float = 0.0           # seconds between periodic stats log lines; 0 = off
    profile_steps: bool = False
    trace_dir: str | None = None              # write a Chrome/Perfetto trace of the engine's steps there
    profile_torch_steps: int = 0              # with trace_dir: torch profiler's op-level trace of this many steps
    speculative_config: dict | str | None = None  # vLLM's: {"method": "ngram", "num_speculative_tokens": k, ...}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
