"""Linear layers: a dense weight for batches, and a weight-only int8 / int4 form for the few-row
matmuls of decode, which are bound by memory bandwidth (runtime/model/execution.py says which
form runs where, and why).

int4 is asymmetric round-to-nearest in groups of 32 along the input dimension: w = q * scale + min
with q in 0..15. That is exactly GGUF's Q4_1 (blocks of 32, a scale and a min per block), so the
embedded Q4_1 checkpoint, dequantised by transformers at conversion, quantises back to its own
4-bit values (a block's min is its q=0 value and its max its q=15 value), up to the rounding of
scale and zero to bf16. int8 is symmetric per output channel.

`int8_group` (int8_group.py, asked for by the model for its LM head only) is symmetric int8 in
groups of 32 with float32 scales, computed by arborlm's C++ kernel: GGUF's Q8_0, which the
embedded checkpoint's (tied) embedding is, quantises back to it exactly. Its output is float32.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from arborlm.runtime.model.execution import ExecutionPlan
from arborlm.runtime.model.layers import int8_group

logger = logging.getLogger(__name__)

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


def int8_group_supported(weight: torch.Tensor) -> bool:
    """Whole groups of 32, and arborlm's C++ kernels built (or buildable) on this machine."""
    if weight.shape[1] % int8_group.GROUP:
        return False
    try:
        int8_group.load_extension()
    except RuntimeError as e:  # no C++ compiler: the layer keeps its dense weight
        logger.warning("int8 group weights unavailable, keeping a dense weight: %s", e)
        return False
    return True


class Linear(nn.Module):
    """y = x @ W.T (+ b). `weight` is the checkpoint's [out, in] tensor in any float dtype.

    `form` overrides the plan's weight-only form for this layer (the model's LM head asks for
    "int8_group"); a form the weight cannot hold leaves it dense ("none")."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: ExecutionPlan, form: str | None = None):
        super().__init__()
        self.small_rows = plan.small_rows
        form = plan.quantization if form is None else form
        if form == "int4" and not int4_supported(weight) or form == "int8_group" and not int8_group_supported(weight):
            form = "none"
        self.form = form
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
        elif self.form == "int8_group":
            q, scales = int8_group.quantize_int8_group32(weight)
            dense = int8_group.dequantize_int8_group32(q, scales)  # a Q8_0 weight's own values
            self.register_buffer("qweight", q, persistent=False)
            self.register_buffer("qscale", scales, persistent=False)
        self.register_buffer("weight", dense.to(plan.act_dtype).contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(plan.act_dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form != "none" and x.shape[0] <= self.small_rows:
            return self.forward_quantized(x)
        return F.linear(x, self.weight, self.bias)

    def forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "int8_group":  # float32 out, any float x (converted in the kernel)
            y = torch.ops.arborlm.int8_group_linear(x.contiguous(), self.qweight, self.qscale)
            return y if self.bias is None else y + self.bias
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
