"""Attention backends over the paged KV pool. `torch` is the portable (CPU) one; `triton`
(triton_attention.py) runs the kernels of arborlm.kernels.

Interface: `forward(q, k, v, layer, batch)` with q [T, H, D], k/v [T, Hkv, D]; it writes k/v to
the pool at `batch.out_slots` and returns [T, H * D].
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from arborlm.runtime.cache.memory_pool import TokenToKVPool
from arborlm.runtime.model.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


def make_attention_backend(name: str, kv_pool: TokenToKVPool, num_heads: int, num_kv_heads: int, head_dim: int):
    """`auto` is `triton` when the pool lives on a GPU and `cpu` (the C++ kernels that read the pool
    in place, layers/paged_attention.py) otherwise, falling back to `torch` where no C++ compiler
    can build them. Triton is imported only when chosen, so the CPU path does not pay for it."""
    if name == "auto":
        name = "triton" if kv_pool.k_buffer.is_cuda else "cpu"
        if name == "cpu":
            try:
                from arborlm.runtime.model.layers.paged_attention import load_extension

                load_extension()
            except RuntimeError as e:
                logger.warning("attention: falling back to the torch backend: %s", e)
                name = "torch"
    if name == "cpu":
        from arborlm.runtime.model.layers.paged_attention import CpuPagedAttentionBackend

        return CpuPagedAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)
    if name == "torch":
        return TorchAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)
    from arborlm.runtime.model.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)


class TorchAttentionBackend:
    # Reads the pool through the padded slot index the model runner gathers each step (the other
    # backends read it in place through the request-to-token table and need no such index).
    gathers_slots = True

    def __init__(self, kv_pool: TokenToKVPool, num_heads: int, num_kv_heads: int, head_dim: int):
        self.pool = kv_pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(self, q, k, v, layer: int, batch: ForwardBatch) -> torch.Tensor:
        self.pool.write(layer, batch.out_slots, k, v)
        if not batch.extend_lens:  # a pure decode step: no scatter into a shared output
            return self._decode(q, layer, batch).view(q.shape[0], -1)
        out = torch.empty_like(q)
        n_ext = len(batch.extend_lens)
        for i in range(n_ext):
            s, n, p = batch.extend_starts[i], batch.extend_lens[i], batch.extend_prefix_lens[i]
            out[s : s + n] = self._extend(q[s : s + n], k[s : s + n], v[s : s + n], p, batch.extend_slots[i], layer)
        if batch.num_decode:
            t0 = q.shape[0] - batch.num_decode
            out[t0:] = self._decode(q[t0:], layer, batch)
        return out.view(q.shape[0], -1)

    def _extend(self, q, k, v, prefix_len, slots, layer):
        # q [n, H, D] -> [1, H, n, D]; with no cached prefix the step's own k/v are the whole context.
        qh = q.transpose(0, 1).unsqueeze(0)
        if prefix_len == 0:
            kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            kh = self.pool.k_buffer[layer][slots].transpose(0, 1).unsqueeze(0)
            vh = self.pool.v_buffer[layer][slots].transpose(0, 1).unsqueeze(0)
            n, total = q.shape[0], slots.numel()
            # Query i sits at position prefix_len + i and sees keys 0..prefix_len + i.
            mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=prefix_len)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)

    def _decode(self, q, layer, batch):
        # GQA trick: the G query heads sharing a KV head become G query rows of that head.
        b = q.shape[0]
        qh = q.view(b, self.num_kv_heads, self.group, self.head_dim)
        kh = self.pool.k_buffer[layer][batch.decode_slots].permute(0, 2, 1, 3)
        vh = self.pool.v_buffer[layer][batch.decode_slots].permute(0, 2, 1, 3)
        if batch.decode_prefix_slots is not None:
            return self._decode_cascade(qh, kh, vh, layer, batch)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=batch.decode_mask, scale=self.scale)
        return o.reshape(b, self.num_heads, self.head_dim)

    def _decode_cascade(self, qh, kh, vh, layer, batch):
        """Decode attention for a batch sharing a prefix: the shared K/V is read once and scored
        for every request in one batched matmul per KV head, instead of being gathered B times."""
        b, hkv, g, d = qh.shape
        kp = self.pool.k_buffer[layer][batch.decode_prefix_slots]  # [P, Hkv, D]
        vp = self.pool.v_buffer[layer][batch.decode_prefix_slots]
        p_len = kp.shape[0]
        q_rows = qh.permute(1, 0, 2, 3).reshape(hkv, b * g, d)
        s_prefix = torch.bmm(q_rows, kp.permute(1, 2, 0)).view(hkv, b, g, p_len).permute(1, 0, 2, 3)
        s_own = torch.matmul(qh, kh.transpose(-1, -2))  # [b, Hkv, G, L_own]
        if batch.decode_mask is not None:
            s_own = s_own.masked_fill(~batch.decode_mask, float("-inf"))
        probs = torch.softmax(torch.cat([s_prefix, s_own], dim=-1) * self.scale, dim=-1)
        p_rows = probs[..., :p_len].permute(1, 0, 2, 3).reshape(hkv, b * g, p_len)
        o = torch.bmm(p_rows, vp.transpose(0, 1)).view(hkv, b, g, d).permute(1, 0, 2, 3)
        o = o + torch.matmul(probs[..., p_len:], vh)
        return o.reshape(b, self.num_heads, self.head_dim)
