"""Fused RMSNorm (+ residual), RoPE and SiLU-and-mul for the CPU (csrc/elementwise.cpp).

Same signatures as the Triton kernels in arborlm.kernels, so the model's fused forward takes either
set; their plain-torch references (arborlm.kernels.*_ref) are what both are tested against. Used by
eager bf16 forwards (prefill, extends, decode batches without a compiled graph): there torch runs
each of these layers as several ops over the whole activation. A compiled decode step keeps the
plain torch ops, which Inductor fuses itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from arborlm.runtime.model.layers.cpu_extension import load_extension


def rmsnorm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """x [T, N] -> weight * norm(x); with `residual`, returns (weight * norm(x + residual), x + residual)."""
    load_extension()
    y, r = torch.ops.arborlm.rmsnorm(x, weight, eps, residual)
    return y if residual is None else (y, r)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor):
    """Rotate q [T, H, D] and k [T, Hkv, D] in place by cos/sin [max_pos, D] rows at `positions` [T]."""
    load_extension()
    torch.ops.arborlm.rope_(q, k, cos, sin, positions)
    return q, k


def silu_and_mul(x: Tensor) -> Tensor:
    """x [T, 2I] (gate | up) -> silu(gate) * up, [T, I]."""
    load_extension()
    return torch.ops.arborlm.silu_and_mul(x)
