"""Linear layers that pick the fastest weight copy for the batch size.

On CPUs without native bf16 arithmetic (no AVX512-BF16 / AMX: e.g. AVX2-only machines) torch's
bf16 GEMM runs ~7x slower than fp32 once the batch has more than a row or two, while a one-row
decode is bound by memory bandwidth, where bf16 weights (half the bytes) win. So with a bf16
model on such a CPU we keep both copies: bf16 for tiny batches, fp32 for everything else.
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


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight = weight.to(dtype).contiguous()
        self.bias = None if bias is None else bias.to(dtype)
        self.weight32 = self.bias32 = None
        if dtype == torch.bfloat16 and weight.device.type == "cpu" and not cpu_has_native_bf16():
            self.weight32 = weight.float().contiguous()
            self.bias32 = None if bias is None else bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight32 is not None and x.shape[0] > SMALL_BATCH:
            return F.linear(x.float(), self.weight32, self.bias32).to(x.dtype)
        return F.linear(x, self.weight, self.bias)
