"""Decode attention over the paged KV pool: one new query token per request.

Flash-decoding: a request's context is cut into `num_splits` pieces scored in parallel (a batch of
a few long requests would otherwise leave most of the GPU idle), then a second pass merges the
partial outputs by their log-sum-exp. The G query heads sharing a KV head are one program's rows,
so each K/V block is loaded once per KV head rather than once per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, K, V, ReqToToken, ReqRows, SeqLens, MidO, MidLse, qk_scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_table,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + h
    hd_mask = (h[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    seq_len = tl.load(SeqLens + b)
    row = tl.load(ReqRows + b)
    split_len = tl.cdiv(seq_len, NUM_SPLITS)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if start < end:
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=hd_mask, other=0.0)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < end
            slots = tl.load(ReqToToken + row * stride_table + n, mask=n_mask, other=0)
            nd_mask = n_mask[:, None] & (d[None, :] < HEAD_DIM)
            k = tl.load(K + slots[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=nd_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            v = tl.load(V + slots[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=nd_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
        out = MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + d[None, :]
        tl.store(out, acc / l[:, None], mask=hd_mask)
        tl.store(MidLse + b * stride_lb + heads * stride_lh + split, m + tl.log2(l), mask=h < GROUP)


@triton.jit
def _decode_merge_kernel(
    MidO, MidLse, SeqLens, O,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    seq_len = tl.load(SeqLens + b)
    used = s * tl.cdiv(seq_len, NUM_SPLITS) < seq_len  # the splits that held at least one token
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + s, mask=used, other=float("-inf"))
    o_mask = used[:, None] & (d[None, :] < HEAD_DIM)
    o = tl.load(MidO + b * stride_mb + h * stride_mh + s[:, None] * stride_ms + d[None, :], mask=o_mask, other=0.0)
    w = tl.exp2(lse - tl.max(lse, 0))
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty), mask=d < HEAD_DIM)


def decode_attention(q, k_buffer, v_buffer, req_to_token, req_rows, seq_lens, scale, out=None,
                     num_splits: int = 8, block_n: int = 64):
    """q [B, H, D]; k/v_buffer [slots, Hkv, D]; request b reads slots req_to_token[req_rows[b], :seq_lens[b]].

    Returns (or fills `out`) [B, H, D]. `num_splits` must be a power of two.
    """
    B, H, D = q.shape
    Hkv = k_buffer.shape[1]
    group = H // Hkv
    assert q.stride(2) == k_buffer.stride(2) == v_buffer.stride(2) == 1 and req_to_token.stride(1) == 1
    out = torch.empty_like(q) if out is None else out
    mid_o = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot wants every dimension >= 16
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_buffer, v_buffer, req_to_token, req_rows, seq_lens, mid_o, mid_lse, scale * LOG2E,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0), *mid_o.stride()[:3], *mid_lse.stride()[:2],
        GROUP=group, HEAD_DIM=D, NUM_SPLITS=num_splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
    )
    _decode_merge_kernel[(B, H)](
        mid_o, mid_lse, seq_lens, out, *mid_o.stride()[:3], *mid_lse.stride()[:2], out.stride(0), out.stride(1),
        HEAD_DIM=D, NUM_SPLITS=num_splits, BLOCK_D=block_d,
    )
    return out


def decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_rows, seq_lens, scale, out=None,
                         num_splits: int = 8, block_n: int = 64):
    """The same in plain torch, one request at a time (`num_splits`, `block_n` only tune the kernel)."""
    out = torch.empty_like(q) if out is None else out
    for b in range(q.shape[0]):
        slots = req_to_token[req_rows[b], : seq_lens[b]]
        k = k_buffer[slots].transpose(0, 1)  # [Hkv, L, D]
        v = v_buffer[slots].transpose(0, 1)
        o = F.scaled_dot_product_attention(q[b].unsqueeze(1), k, v, scale=scale, enable_gqa=True)
        out[b] = o.squeeze(1)
    return out
