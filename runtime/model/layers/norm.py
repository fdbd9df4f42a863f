"""RMSNorm as transformers computes it: in float32, then scaled in the activation dtype (a bf16
norm loses this model family's large activation outliers). Plain ops beat F.rms_norm on a CPU,
which decomposes it into more of them."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.to(dtype).contiguous(), persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)
