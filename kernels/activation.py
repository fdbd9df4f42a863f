"""SiLU-and-mul, the gated MLP's activation: silu(gate) * up in one pass over the fused gate_up output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(X, Y, stride_x, stride_y, I, BLOCK: tl.constexpr):
    t, blk = tl.program_id(0), tl.program_id(1)
    c = blk * BLOCK + tl.arange(0, BLOCK)
    mask = c < I
    gate = tl.load(X + t * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + t * stride_x + I + c, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # rounded as F.silu's output is
    tl.store(Y + t * stride_y + c, silu * up, mask=mask)


def silu_and_mul(x, block: int = 1024):
    """x [T, 2 * I] (gate then up) -> [T, I]."""
    assert x.stride(-1) == 1
    T, I = x.shape[0], x.shape[1] // 2
    y = torch.empty((T, I), dtype=x.dtype, device=x.device)
    block = min(block, triton.next_power_of_2(I))
    _silu_and_mul_kernel[(T, triton.cdiv(I, block))](x, y, x.stride(0), y.stride(0), I, BLOCK=block)
    return y


def silu_and_mul_ref(x, block: int = 1024):
    """`block` only tunes the kernel."""
    I = x.shape[1] // 2
    return torch.nn.functional.silu(x[:, :I]) * x[:, I:]
