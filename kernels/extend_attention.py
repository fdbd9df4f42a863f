"""Extend (prefill) attention over the paged KV pool for a ragged batch.

Each request's new tokens attend fully to its cached prefix, read from the pool through the
request-to-token table, and causally to themselves, read from the step's contiguous k/v (so the
dense part never goes through the table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _extend_kernel(
    Q, K, V, KBuf, VBuf, O, ReqToToken, ReqRows, PrefixLens, ExtStarts, ExtLens, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_bt, stride_bh, stride_ct, stride_ch, stride_ot, stride_oh, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r, h, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh = h // GROUP
    n_ext = tl.load(ExtLens + r)
    if mb * BLOCK_M < n_ext:
        start = tl.load(ExtStarts + r)
        prefix = tl.load(PrefixLens + r)
        row = tl.load(ReqRows + r)
        i = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the request's new tokens
        d = tl.arange(0, BLOCK_D)
        d_mask = d[None, :] < HEAD_DIM
        q = tl.load(Q + (start + i[:, None]) * stride_qt + h * stride_qh + d[None, :],
                    mask=(i[:, None] < n_ext) & d_mask, other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # The cached prefix: every new token sees all of it.
        for n0 in range(0, prefix, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < prefix
            slots = tl.load(ReqToToken + row * stride_table + n, mask=n_mask, other=0)
            k = tl.load(KBuf + slots[:, None] * stride_bt + kvh * stride_bh + d[None, :],
                        mask=n_mask[:, None] & d_mask, other=0.0)
            v = tl.load(VBuf + slots[:, None] * stride_ct + kvh * stride_ch + d[None, :],
                        mask=n_mask[:, None] & d_mask, other=0.0)
            s = tl.where(n_mask[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
            m, l, acc = _online_softmax_step(s, v, m, l, acc)
        # The new tokens themselves, causally; blocks past this query block's last row are skipped.
        for n0 in range(0, tl.minimum(n_ext, (mb + 1) * BLOCK_M), BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < n_ext
            k = tl.load(K + (start + n[:, None]) * stride_kt + kvh * stride_kh + d[None, :],
                        mask=n_mask[:, None] & d_mask, other=0.0)
            v = tl.load(V + (start + n[:, None]) * stride_vt + kvh * stride_vh + d[None, :],
                        mask=n_mask[:, None] & d_mask, other=0.0)
            visible = n_mask[None, :] & (n[None, :] <= i[:, None])
            s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
            m, l, acc = _online_softmax_step(s, v, m, l, acc)
        out = acc / l[:, None]
        tl.store(O + (start + i[:, None]) * stride_ot + h * stride_oh + d[None, :],
                 out.to(O.dtype.element_ty), mask=(i[:, None] < n_ext) & d_mask)


@triton.jit
def _online_softmax_step(s, v, m, l, acc):
    """Fold one block of base-2 scores into the running max, normaliser and output. Every row has
    a visible key in the first block it meets (prefix key 0, or new token 0), so m is finite after it."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l * alpha + tl.sum(p, 1), acc


def extend_attention(q, k, v, k_buffer, v_buffer, req_to_token, req_rows, prefix_lens, extend_starts,
                     extend_lens, scale, max_extend_len: int, out=None, block_m: int = 64, block_n: int = 64):
    """q [T, H, D], k/v [T, Hkv, D]: the new tokens, request after request (request r's at
    extend_starts[r] : + extend_lens[r]); its prefix is req_to_token[req_rows[r], :prefix_lens[r]].

    Returns (or fills `out`) [T, H, D].
    """
    H, D = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    assert q.stride(2) == k.stride(2) == v.stride(2) == k_buffer.stride(2) == v_buffer.stride(2) == 1
    assert req_to_token.stride(1) == 1
    out = torch.empty_like(q) if out is None else out
    grid = (req_rows.shape[0], H, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q, k, v, k_buffer, v_buffer, out, req_to_token, req_rows, prefix_lens, extend_starts, extend_lens,
        scale * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1), req_to_token.stride(0),
        GROUP=H // Hkv, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)),  # tl.dot wants every dimension >= 16
    )
    return out


def extend_attention_ref(q, k, v, k_buffer, v_buffer, req_to_token, req_rows, prefix_lens, extend_starts,
                         extend_lens, scale, max_extend_len: int, out=None, block_m: int = 64, block_n: int = 64):
    """The same in plain torch, one request at a time (`max_extend_len` and the blocks only shape the kernel's grid)."""
    out = torch.empty_like(q) if out is None else out
    for r in range(req_rows.shape[0]):
        s, n, p = int(extend_starts[r]), int(extend_lens[r]), int(prefix_lens[r])
        slots = req_to_token[req_rows[r], :p]
        kr = torch.cat([k_buffer[slots], k[s : s + n]]).transpose(0, 1)  # [Hkv, p + n, D]
        vr = torch.cat([v_buffer[slots], v[s : s + n]]).transpose(0, 1)
        mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(diagonal=p)  # query i sees keys <= p + i
        o = F.scaled_dot_product_attention(q[s : s + n].transpose(0, 1), kr, vr, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        out[s : s + n] = o.transpose(0, 1)
    return out
