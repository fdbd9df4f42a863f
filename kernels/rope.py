"""Rotary position embedding (rotate-half / NeoX layout), applied in place to q and k in one launch.

q and k may be strided views into the fused qkv projection; rotating them where they lie saves the
copies and the concatenation the torch version makes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, stride_h, num_heads, c, s, BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_heads) & (d[None, :] < HALF)
    p1 = X + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, Cos, Sin, Pos, stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, num_q_heads,
                 num_k_heads, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(Pos + t)
    d = tl.arange(0, BLOCK_D)
    # The tables repeat their first half (cat([freqs, freqs])), so only that half is read.
    c = tl.load(Cos + pos * stride_cos + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(Sin + pos * stride_cos + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q + t * stride_qt, stride_qh, num_q_heads, c, s, BLOCK_HQ, HALF, BLOCK_D)
    _rotate_heads(K + t * stride_kt, stride_kh, num_k_heads, c, s, BLOCK_HK, HALF, BLOCK_D)


def rope(q, k, cos, sin, positions):
    """Rotate q [T, H, D] and k [T, Hkv, D] in place by cos/sin [max_pos, D] rows at `positions` [T]."""
    assert q.stride(2) == k.stride(2) == 1 and cos.is_contiguous() and sin.is_contiguous()
    half = q.shape[2] // 2
    _rope_kernel[(q.shape[0],)](
        q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        q.shape[1], k.shape[1], HALF=half, BLOCK_D=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
    )
    return q, k


def rope_ref(q, k, cos, sin, positions):
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    for x in (q, k):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        x.copy_(x * c + rotated * s)
    return q, k
