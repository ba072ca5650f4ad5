"""Hugging Face directory (config.json + *.safetensors) -> a ready LlamaForCausalLM (or one rank's
shard of it). A GGUF file reaches here too: the registry converts it once into such a directory."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from lamina.config import ModelConfig, ModelLoadError
from lamina.distributed.sharding import Part, Shard
from lamina.kernels import Backend, get_backend
from lamina.models.llama import LlamaForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
          "float": torch.float32}


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    """'auto': bf16 on GPUs and on CPUs with native bf16 math; float32 elsewhere. A float16
    checkpoint stays float16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
        return DTYPES[dtype]
    if device.type == "cuda":
        if cfg.torch_dtype == "float16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, s) for s in shards]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise ModelLoadError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}")
    return files


def load_model(model_dir: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               backend: Backend | str | None = None, max_len: int | None = None,
               shard: Shard = Shard()) -> LlamaForCausalLM:
    """Build the model straight at its final dtype and device, then fill it one checkpoint tensor at
    a time from memory-mapped safetensors, so two full copies of the weights never coexist. With a
    `shard` of a tensor-parallel group, the model holds that rank's part only, and only that part of
    each tensor is read from the file (`model.bytes_read` counts what was)."""
    cfg = ModelConfig.from_dir(model_dir)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device, cfg)
    ops = (backend if isinstance(backend, Backend) else get_backend(backend, device)).ops
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg, ops, max_len=max_len, shard=shard)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.cos_sin_cache = model.cos_sin_cache.to(device)

    expected = model.expected_weights()
    filled: set[str] = set()
    bytes_read = 0
    with torch.no_grad():
        for path in safetensors_files(model_dir):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    tensor_slice = f.get_slice(name)
                    try:
                        part = model.part_of(name, tuple(tensor_slice.get_shape()))
                        if part is None:
                            continue
                        tensor = read_part(tensor_slice, part)
                        bytes_read += tensor.numel() * tensor.element_size()
                        done = model.load_weight(name, tensor)
                    except ValueError as e:
                        raise ModelLoadError(f"{os.path.basename(path)}: {e}") from None
                    if done is not None:
                        filled.add(done)
    missing = expected - filled
    if missing:
        shown = ", ".join(sorted(missing)[:8])
        raise ModelLoadError(f"checkpoint in {model_dir} lacks {len(missing)} weights: {shown}"
                             + (" ..." if len(missing) > 8 else ""))
    model.eval()
    model.dtype = torch_dtype
    model.bytes_read = bytes_read
    return model


def read_part(tensor_slice, part: Part) -> torch.Tensor:
    """Only `part` of a safetensors slice (safe_open(...).get_slice), read from the file."""
    shape = tensor_slice.get_shape()
    if not shape:
        return tensor_slice[...]
    if part.dim == 0:
        return tensor_slice[part.start:part.start + part.length]
    return tensor_slice[:, part.start:part.start + part.length]
