"""Layers chosen when the model is built: which linear layer serves each of a model's projections.

The model is written with plain nn.Linear and an activation layer (activation.SiluAndMul). Once its
weights are loaded, `build_linears` swaps each nn.Linear for the layer that will serve it here:

    linear.Bf16Linear    bf16 on CPU: lamina's packed GEMM or torch's matmul, by row count
    linear.Bf16SwiGLU    an MLP's gate/up projection on CPU, applying SwiGLU itself (the MLP's own
                         activation becomes an identity)
    quant.Int8Linear     --quantization int8 (and int4's lm_head)
    quant.Int4Linear     --quantization int4

A layer whose plan is torch's matmul at every row count stays an nn.Linear. With tensor parallelism
(a `parallel` context), parallel.parallelize then wraps the layers that combine the ranks' parts. `linear_choices` is the
one rule for which op serves which projection: the kernel dispatch measures exactly those ops
(engine/autotune.py), and `build_linears` puts them in place. A new layer type is a class here, an
op in kernels/dispatch.py, and a line in `linear_choices`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lamina.distributed.group import ParallelContext
from lamina.kernels.dispatch import KernelPlan
from lamina.layers.linear import Bf16Linear, Bf16SwiGLU, PlannedLinear
from lamina.layers.parallel import ROW_PARALLEL, parallelize
from lamina.layers.quant import INT4_GROUP_SIZE, METHODS, Int4Linear, Int8Linear

log = logging.getLogger("lamina.layers")

LAYERS: dict[str, type[PlannedLinear]] = {"bf16_linear": Bf16Linear, "bf16_swiglu": Bf16SwiGLU,
                                          "int8_linear": Int8Linear, "int4_linear": Int4Linear}


@dataclass(frozen=True)
class LinearChoice:
    name: str                 # the module's name in the model
    op: str                   # the dispatch's op (a key of LAYERS)
    out_features: int
    in_features: int
    impls: tuple[str, ...]    # the implementations that can serve it here


def linear_choices(model: nn.Module, quantization: str | None, device: torch.device) -> list[LinearChoice]:
    """Which op serves each nn.Linear of `model` on `device` (a model on the meta device is listed as
    if it were there), and what can implement it. Projections left to plain nn.Linear are not listed."""
    if quantization is not None and quantization not in METHODS:
        raise ValueError(f"unknown quantization {quantization!r}; lamina supports {', '.join(METHODS)}")
    choices = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        method = quantization
        if method == "int4" and name == "lm_head":
            # the output projection is the most sensitive matrix (llama.cpp's 4-bit files keep it
            # at 6-8 bits too; the default model's is Q8_0): int8 keeps perplexity within 2 %
            method = "int8"
        elif method == "int4" and m.in_features % INT4_GROUP_SIZE:
            method = None    # build_linears warns
        if method is not None:
            op = f"{method}_linear"
        elif device.type == "cpu" and m.weight.dtype == torch.bfloat16:
            op = "bf16_swiglu" if name.rpartition(".")[2] == "gate_up_proj" and Bf16SwiGLU.fits(m) else "bf16_linear"
        else:
            continue
        choices.append(LinearChoice(name, op, m.out_features, m.in_features, LAYERS[op].impls(m, device)))
    return choices


def build_linears(model: nn.Module, quantization: str | None, plan: KernelPlan, device: torch.device,
                  parallel: ParallelContext | None = None) -> int:
    """Put in place the layer of each projection, with the implementations `plan` chose for it, and
    the tensor-parallel layers where `parallel` spans several ranks; returns how many were replaced."""
    replaced = 0
    if quantization == "int4":
        for name, m in model.named_modules():
            if type(m) is nn.Linear and name != "lm_head" and m.in_features % INT4_GROUP_SIZE:
                log.warning("%s: %d input features are not a multiple of %d; left unquantized",
                            name, m.in_features, INT4_GROUP_SIZE)
    for choice in linear_choices(model, quantization, device):
        row_plan = plan.linear(choice.op, choice.out_features, choice.in_features, choice.impls)
        for impl in (row_plan.decode, row_plan.batch, row_plan.prefill):
            if impl not in choice.impls:
                raise ValueError(f"{choice.name}: {choice.op} cannot run {impl!r} here (it can run "
                                 f"{', '.join(choice.impls)}); check $LAMINA_DISPATCH")
        linear = model.get_submodule(choice.name)
        if choice.op.startswith("bf16") and all(i == "torch" for i in vars(row_plan).values()):
            continue      # torch's matmul at every row count: the nn.Linear itself
        options = {}
        if choice.op == "int8_linear" and parallel is not None and parallel.world_size > 1 \
                and choice.name.rpartition(".")[2] in ROW_PARALLEL:
            # a row-parallel shard holds a slice of each output channel: scale it as the whole row
            options["amax"] = parallel.max_over_ranks(linear.weight.detach().abs().amax(dim=1).float())
        _replace(model, choice.name, LAYERS[choice.op](linear, row_plan, **options))
        replaced += 1
        if choice.op == "bf16_swiglu":   # the GEMM applies SwiGLU itself, so the MLP's own activation goes
            _replace(model, choice.name.rpartition(".")[0] + ".act", nn.Identity())
    if parallel is not None and parallel.world_size > 1:
        parallelize(model, parallel)
    return replaced


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
