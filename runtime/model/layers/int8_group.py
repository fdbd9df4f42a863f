"""Weight-only int8 in groups of 32 along the input dimension, symmetric, float32 scales: the LM
head's form for the few-row matmuls of decode (csrc/int8_linear.cpp computes it).

For each output row and block of 32 inputs, d = max|w| / 127 and q = round(w / d) in -127..127.
That is GGUF's Q8_0 (int8 blocks of 32, one fp16 scale each), so a Q8_0 tensor dequantised by
transformers at conversion quantises back to its own q and d exactly: the head computes with the
checkpoint's values, reading a bit over half of bf16's bytes (one byte a weight, four a block).

`int8_group_linear` returns float32 [B, N] whatever x's dtype (the logits are wanted in float32);
`int8_group_linear_ref` is its plain-torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from arborlm.runtime.model.layers.cpu_extension import load_extension

GROUP = 32


def quantize_int8_group32(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] (K % 32 == 0) -> (q int8 [N, K], scales float32 [N, K/32]), symmetric per group."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"quantize_int8_group32: K={k} is not a multiple of {GROUP}")
    g = w.float().view(n, k // GROUP, GROUP)
    d = g.abs().amax(-1) / 127
    # divide (not multiply by 1/d): Q8_0 values q * d then give back q exactly
    q = (g / torch.where(d > 0, d, torch.ones_like(d)).unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return q.view(n, k), d


def dequantize_int8_group32(q: Tensor, scales: Tensor) -> Tensor:
    """float32 [N, K]: q * its group's scale (the weight both the op and the reference use)."""
    return q.float() * scales.repeat_interleave(GROUP, 1)


def int8_group_linear(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """x [B, K] (float32 / bf16 / fp16) @ dequantised (q, scales).T -> float32 [B, N]."""
    load_extension()
    return torch.ops.arborlm.int8_group_linear(x, q, scales)


def int8_group_linear_ref(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    return F.linear(x.float(), dequantize_int8_group32(q, scales))
