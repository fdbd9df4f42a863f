"""Compute dtype and linear layers that pick the fastest weight copy for the batch size.

On CPUs without native bf16 arithmetic (no AVX512-BF16 / AMX, e.g. AVX2-only machines) torch's
bf16 kernels emulate it: GEMM runs ~7x slower than fp32 once a batch has two or more rows. A
one-row decode, though, is bound by memory bandwidth, where bf16 weights (half the bytes) win.
So a bf16 model on such a CPU computes in fp32 (activations, KV, batched matmuls) and keeps a bf16
copy of each weight for one-row matmuls.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SMALL_BATCH = 1  # rows up to which the bf16 copy is used (measured: bf16 loses from 2 rows on AVX2)


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(dtype: torch.dtype, device: str = "cpu") -> torch.dtype:
    """The dtype activations and KV use for a model stored in `dtype`."""
    if dtype == torch.bfloat16 and device == "cpu" and not cpu_has_native_bf16():
        return torch.float32
    return dtype


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, compute: torch.dtype):
        self.weight = weight.to(compute).contiguous()
        self.bias = None if bias is None else bias.to(compute)
        self.small = self.small_bias = None
        if dtype != compute:
            self.small = weight.to(dtype).contiguous()
            self.small_bias = None if bias is None else bias.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.small is not None and x.shape[0] <= SMALL_BATCH:
            return F.linear(x.to(self.small.dtype), self.small, self.small_bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)
