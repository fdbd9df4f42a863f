"""Linear layers: a dense weight for batches, and a weight-only int8 / int4 form for the few-row
matmuls of decode, which are bound by memory bandwidth (runtime/model/execution.py says which
form runs where, and why).

int4 is asymmetric round-to-nearest in groups of 32 along the input dimension: w = q * scale + min
with q in 0..15. That is exactly GGUF's Q4_1 (blocks of 32, a scale and a min per block), so the
embedded Q4_1 checkpoint, dequantised by transformers at conversion, quantises back to its own
4-bit values (a block's min is its q=0 value and its max its q=15 value), up to the rounding of
scale and zero to bf16. int8 is symmetric per output channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arborlm.runtime.model.execution import ExecutionPlan

GROUP = 32


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int32 [N, K] in 0..15, scale [N, K/group], min [N, K/group]), float32 stats."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = ((g - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).round().clamp(0, 15).to(torch.int32)
    return q.view(n, k), scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    n, k = q.shape
    return (q.view(n, k // group, group).float() * scale.unsqueeze(-1) + lo.unsqueeze(-1)).view(n, k)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale [N]), symmetric per output channel."""
    scale = w.float().abs().amax(1) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (w.float() * inv.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8), scale


def int4_supported(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return k % GROUP == 0 and n % 16 == 0  # the packed layout wants whole groups and 16-row tiles


class Linear(nn.Module):
    """y = x @ W.T (+ b). `weight` is the checkpoint's [out, in] tensor in any float dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: ExecutionPlan):
        super().__init__()
        self.small_rows = plan.small_rows
        self.form = plan.quantization if plan.quantization != "int4" or int4_supported(weight) else "none"
        dense = weight
        if self.form == "int4":
            q, scale, lo = quantize_int4(weight)
            # torch's int4 kernel computes (q - 8) * scale + zero, with scale and zero in the
            # activation dtype; the dense copy uses those same rounded values.
            scale16, zero16 = scale.to(torch.bfloat16), (lo + 8 * scale).to(torch.bfloat16)
            dense = dequantize_int4(q, scale16.float(), zero16.float() - 8 * scale16.float())
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
            self.register_buffer("scales_zeros", torch.stack([scale16, zero16], -1).transpose(0, 1).contiguous(),
                                 persistent=False)
        elif self.form == "int8":
            q, scale = quantize_int8(weight)
            dense = q.float() * scale.to(torch.bfloat16).float().unsqueeze(1)
            self.register_buffer("qweight", q, persistent=False)
            self.register_buffer("qscale", scale.to(torch.bfloat16), persistent=False)
        self.register_buffer("weight", dense.to(plan.act_dtype).contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(plan.act_dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form != "none" and x.shape[0] <= self.small_rows:
            return self.forward_quantized(x)
        return F.linear(x, self.weight, self.bias)

    def forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.form == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qweight, GROUP, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.qscale)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight every form of this layer computes with (tests compare against F.linear on it)."""
        return self.weight.float()
