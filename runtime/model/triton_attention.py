"""Attention through the Triton kernels (arborlm.kernels), same interface as TorchAttentionBackend.

Both kernels read the pool through the request-to-token table, so unlike the torch backend there is
no padded gather index: a decode's cost follows its own length, and the extends of a step are one
launch rather than one call per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from arborlm import kernels
from arborlm.runtime.cache.memory_pool import TokenToKVPool
from arborlm.runtime.errors import UnsupportedError
from arborlm.runtime.model.forward_batch import ForwardBatch

MAX_DECODE_SPLITS = 8
BLOCK = 64


@dataclass
class _StepMeta:
    """The batch's lengths as device tensors, built once per step and shared by every layer."""

    ext_rows: torch.Tensor
    prefix_lens: torch.Tensor
    ext_starts: torch.Tensor
    ext_lens: torch.Tensor
    max_ext_len: int
    dec_rows: torch.Tensor
    dec_lens: torch.Tensor
    num_splits: int


class TritonAttentionBackend:
    def __init__(self, kv_pool: TokenToKVPool, num_heads: int, num_kv_heads: int, head_dim: int):
        if not kv_pool.k_buffer.is_cuda and not kernels.interpreted():
            raise UnsupportedError(
                "attention_backend='triton' needs the KV pool on a CUDA device, or TRITON_INTERPRET=1 set "
                "before arborlm.kernels is imported to run Triton's interpreter on the CPU (slow; for tests)"
            )
        self.pool = kv_pool
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        self._batch: ForwardBatch | None = None
        self._meta: _StepMeta | None = None

    def forward(self, q, k, v, layer: int, batch: ForwardBatch) -> torch.Tensor:
        self.pool.write(layer, batch.out_slots, k, v)
        meta = self._step_meta(batch)
        k_buf, v_buf = self.pool.k_buffer[layer], self.pool.v_buffer[layer]
        out = torch.empty_like(q)
        t0 = q.shape[0] - batch.num_decode
        if batch.extend_lens:
            kernels.extend_attention(
                q[:t0], k[:t0], v[:t0], k_buf, v_buf, batch.req_to_token, meta.ext_rows, meta.prefix_lens,
                meta.ext_starts, meta.ext_lens, self.scale, meta.max_ext_len, out=out[:t0], block_m=BLOCK, block_n=BLOCK,
            )
        if batch.num_decode:
            kernels.decode_attention(
                q[t0:], k_buf, v_buf, batch.req_to_token, meta.dec_rows, meta.dec_lens, self.scale, out=out[t0:],
                num_splits=meta.num_splits, block_n=BLOCK,
            )
        return out.view(q.shape[0], -1)

    def _step_meta(self, batch: ForwardBatch) -> _StepMeta:
        if batch is not self._batch:
            self._batch, self._meta = batch, self._build_meta(batch)
        return self._meta

    def _build_meta(self, batch: ForwardBatch) -> _StepMeta:
        dev = self.pool.k_buffer.device
        n_ext = len(batch.extend_lens)
        rows = batch.req_rows.to(dev)
        seq_lens = batch.seq_lens.to(dev)
        dec_max = int(batch.seq_lens[n_ext:].max()) if batch.num_decode else 0
        # Enough splits to spread a short batch over the GPU, never one with less than a block.
        splits = min(MAX_DECODE_SPLITS, triton.next_power_of_2(triton.cdiv(max(dec_max, 1), BLOCK)))
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=dev)
        return _StepMeta(
            ext_rows=rows[:n_ext], prefix_lens=as_tensor(batch.extend_prefix_lens),
            ext_starts=as_tensor(batch.extend_starts), ext_lens=as_tensor(batch.extend_lens),
            max_ext_len=max(batch.extend_lens, default=0), dec_rows=rows[n_ext:], dec_lens=seq_lens[n_ext:],
            num_splits=splits,
        )
