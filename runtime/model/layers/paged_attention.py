"""Paged attention on the CPU that reads the KV pool in place through the request-to-token table.

The torch backend (attention.py) gathers every decode's whole context out of the pool each step
(`k_buffer[layer][decode_slots]`); here a C++/OpenMP kernel (csrc/paged_attention.cpp) walks the
slots itself, so a step costs what its context is, not a copy of it plus a padded mask.

The kernels are `torch.library` custom ops (`arborlm::decode_attention`, `arborlm::extend_attention`,
`arborlm::kv_write`) with fake implementations whose output shapes depend only on q: a
`torch.compile`d decode step holds them as opaque nodes and does not recompile as sequences grow
(sequence lengths and the cascade prefix length travel as tensors, never as Python ints).

Each op has a plain-torch reference of the same signature beside it (`*_ref`), for tests. The ops'
schemas and the build of the extension are in cpu_extension.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from arborlm.runtime.cache.memory_pool import TokenToKVPool
from arborlm.runtime.model.forward_batch import ForwardBatch
from arborlm.runtime.model.layers.cpu_extension import load_extension

__all__ = [
    "CpuPagedAttentionBackend", "decode_attention", "decode_attention_ref", "extend_attention",
    "extend_attention_ref", "kv_write", "kv_write_ref", "load_extension",
]


def decode_attention(
    q: Tensor, k_buffer: Tensor, v_buffer: Tensor, layer: int, req_to_token: Tensor, req_rows: Tensor,
    seq_lens: Tensor, prefix_len: Tensor, scale: float,
) -> Tensor:
    """Request b (q[b], [B, H, D]) attends to slots req_to_token[req_rows[b], :seq_lens[b]]. When
    prefix_len (a 0-d int64 tensor) is P > 0, those first P slots are shared by every request and
    read once for the whole batch (cascade). Returns [B, H, D] in q's dtype."""
    load_extension()
    return torch.ops.arborlm.decode_attention(q, k_buffer, v_buffer, layer, req_to_token, req_rows, seq_lens,
                                              prefix_len, scale)


def extend_attention(
    q: Tensor, k_buffer: Tensor, v_buffer: Tensor, layer: int, req_to_token: Tensor, req_row: int,
    prefix_len: int, scale: float,
) -> Tensor:
    """One request's n new queries (q [n, H, D]) at positions prefix_len.. attend causally to the
    slots req_to_token[req_row, :prefix_len + n], all already written to the pool."""
    load_extension()
    return torch.ops.arborlm.extend_attention(q, k_buffer, v_buffer, layer, req_to_token, req_row, prefix_len, scale)


def kv_write(k_buffer: Tensor, v_buffer: Tensor, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """k_buffer[layer][slots] = k and likewise v, in place (k/v [T, Hkv, D], same dtype as the pool)."""
    load_extension()
    torch.ops.arborlm.kv_write(k_buffer, v_buffer, layer, slots, k, v)


# ----------------------------------------------------------------------------------------------
# Plain-torch references: gather + SDPA, one request at a time


def decode_attention_ref(q, k_buffer, v_buffer, layer, req_to_token, req_rows, seq_lens, prefix_len, scale):
    """decode_attention by gathering each request's slots; the shared prefix needs no special case
    (its slots are in every request's table row), so prefix_len is unused."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        slots = req_to_token[int(req_rows[b]), : int(seq_lens[b])]
        k = k_buffer[layer][slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        v = v_buffer[layer][slots].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q[b][None, :, None], k, v, scale=scale, enable_gqa=True)  # [1, H, 1, D]
        out[b] = o[0, :, 0]
    return out


def extend_attention_ref(q, k_buffer, v_buffer, layer, req_to_token, req_row, prefix_len, scale):
    """extend_attention by gathering the slots and a dense causal mask offset by the prefix."""
    n = q.shape[0]
    slots = req_to_token[req_row, : prefix_len + n]
    k = k_buffer[layer][slots].transpose(0, 1).unsqueeze(0)  # 4-D: SDPA's fast CPU kernel wants a batch dim
    v = v_buffer[layer][slots].transpose(0, 1).unsqueeze(0)
    mask = torch.ones(n, prefix_len + n, dtype=torch.bool).tril(diagonal=prefix_len)
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


def kv_write_ref(k_buffer, v_buffer, layer, slots, k, v):
    k_buffer[layer].index_copy_(0, slots, k)
    v_buffer[layer].index_copy_(0, slots, v)


# ----------------------------------------------------------------------------------------------
# Backend


# bf16 extends over a cached prefix with more query rows (new tokens * heads) than this run as gather +
# SDPA: there torch's flash kernel does the two GEMMs on AMX and overtakes this kernel's AVX-512 FMAs
# (measured crossover ~20 tokens at H=9 over a 2000-token prefix; float32 has no crossover).
EXTEND_MAX_ROWS_BF16 = 160


@dataclass
class _StepMeta:
    """Per-step views of the batch shared by every layer (built once per ForwardBatch)."""

    ext_rows: list[int]
    dec_rows: Tensor
    dec_lens: Tensor
    prefix_len: Tensor  # 0-d int64: the cascade prefix shared by all decodes, or 0


class CpuPagedAttentionBackend:
    """Same interface as TorchAttentionBackend: `forward(q, k, v, layer, batch) -> [T, H * D]`.

    Writes k/v to the pool at batch.out_slots, then: extends without a cached prefix run SDPA on
    their own k/v (nothing to read from the pool), extends over a cached prefix and all decodes read
    the pool in place through batch.req_to_token. Decodes sharing a prefix (decode_prefix_slots)
    take the cascade path of the kernel. Needs batch.req_to_token/req_rows/seq_lens; decode_slots,
    decode_mask and extend_slots are not read. Long bf16 extends over a prefix gather + SDPA (see
    EXTEND_MAX_ROWS_BF16).
    """

    cpu_kernels = True  # the extension is loaded: the model may use its fused layers too (fused_cpu.py)

    def __init__(self, kv_pool: TokenToKVPool, num_heads: int, num_kv_heads: int, head_dim: int):
        load_extension()  # build now: the first step should not pay for it, and errors surface early
        self.pool = kv_pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self._batch: ForwardBatch | None = None
        self._meta: _StepMeta | None = None
        self.extend_max_rows = EXTEND_MAX_ROWS_BF16 if kv_pool.k_buffer.dtype == torch.bfloat16 else None

    def _step_meta(self, batch: ForwardBatch) -> _StepMeta:
        if batch is self._batch and self._meta is not None:
            return self._meta
        if batch.req_to_token is None or batch.req_rows is None or batch.seq_lens is None:
            raise ValueError("CpuPagedAttentionBackend needs ForwardBatch.req_to_token, req_rows and seq_lens")
        n_ext = len(batch.extend_lens)
        p = 0 if batch.decode_prefix_slots is None else int(batch.decode_prefix_slots.numel())
        self._meta = _StepMeta(
            ext_rows=batch.req_rows[:n_ext].tolist(),
            dec_rows=batch.req_rows[n_ext:].contiguous(),
            dec_lens=batch.seq_lens[n_ext:].contiguous(),
            prefix_len=torch.tensor(p, dtype=torch.int64),
        )
        self._batch = batch
        return self._meta

    def forward(self, q, k, v, layer: int, batch: ForwardBatch) -> Tensor:
        kb, vb = self.pool.k_buffer, self.pool.v_buffer
        kv_write(kb, vb, layer, batch.out_slots, k, v)
        meta = self._step_meta(batch)
        T = q.shape[0]
        if not batch.extend_lens:
            return decode_attention(q, kb, vb, layer, batch.req_to_token, meta.dec_rows, meta.dec_lens,
                                    meta.prefix_len, self.scale).view(T, -1)
        out = torch.empty_like(q)
        for i, (s, n, p) in enumerate(zip(batch.extend_starts, batch.extend_lens, batch.extend_prefix_lens)):
            if p == 0:  # the step's own k/v are the whole context: dense causal SDPA
                qh, kh, vh = (x[s : s + n].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True)
                out[s : s + n] = o.squeeze(0).transpose(0, 1)
            elif self.extend_max_rows is None or n * self.num_heads <= self.extend_max_rows:
                out[s : s + n] = extend_attention(q[s : s + n], kb, vb, layer, batch.req_to_token, meta.ext_rows[i],
                                                  p, self.scale)
            else:
                out[s : s + n] = extend_attention_ref(q[s : s + n], kb, vb, layer, batch.req_to_token, meta.ext_rows[i],
                                                      p, self.scale)
        if batch.num_decode:
            t0 = T - batch.num_decode
            out[t0:] = decode_attention(q[t0:], kb, vb, layer, batch.req_to_token, meta.dec_rows, meta.dec_lens,
                                        meta.prefix_len, self.scale)
        return out.view(T, -1)
