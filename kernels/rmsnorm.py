"""RMSNorm with an optional residual add fused in: one read of x (and the residual) per row
instead of the three or four passes the unfused torch ops make."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(X, R, W, Y, ROut, eps, stride_x, stride_r, stride_y, stride_ro,
                    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    t = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    mask = c < N
    x = tl.load(X + t * stride_x + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the input dtype first, as the unfused `x + residual` does.
        x = x + tl.load(R + t * stride_r + c, mask=mask, other=0.0)
        tl.store(ROut + t * stride_ro + c, x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(W + c, mask=mask, other=0.0)
    # Normalise in float32, cast, then scale by the weight: transformers' Llama order.
    y = (x * rstd).to(Y.dtype.element_ty) * w
    tl.store(Y + t * stride_y + c, y, mask=mask)


def rmsnorm(x, weight, eps: float, residual=None):
    """x [T, N] -> weight * norm(x); with `residual`, returns (norm(x + residual) * weight, x + residual)."""
    assert x.stride(-1) == 1 and weight.is_contiguous()
    T, N = x.shape
    y = torch.empty_like(x)
    r_out = torch.empty_like(x) if residual is not None else y
    r = residual if residual is not None else x
    _rmsnorm_kernel[(T,)](x, r, weight, y, r_out, eps, x.stride(0), r.stride(0), y.stride(0), r_out.stride(0),
                          N=N, BLOCK=triton.next_power_of_2(N), HAS_RESIDUAL=residual is not None)
    return y if residual is None else (y, r_out)


def rmsnorm_ref(x, weight, eps: float, residual=None):
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return y if residual is None else (y, x)
