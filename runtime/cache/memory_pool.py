"""Paged KV memory: token-granular slots in preallocated per-layer K/V buffers.

Two pools, as in SGLang:
- `ReqToTokenPool`: one row per running request mapping its positions to KV slots.
- `TokenToKVPool`: the K and V buffers of every layer plus the slot allocator.
Slot 0 is reserved as a padding slot (batched gathers read it for masked positions), so the pool
has `size + 1` rows and hands out slots 1..size.
"""

from __future__ import annotations

import torch


class SlotAllocator:
    """Free-list allocator over slots 1..size that can never hand out a slot twice.

    `is_free` is the ground truth; `free()` of a slot that is already free raises, so a double
    free (the usual way a slot ends up owned twice) is caught where it happens.
    """

    def __init__(self, size: int):
        self.size = size
        self.clear()

    def clear(self) -> None:
        self.free_slots = torch.arange(1, self.size + 1, dtype=torch.int64)
        self.is_free = torch.ones(self.size + 1, dtype=torch.bool)
        self.is_free[0] = False

    def available(self) -> int:
        return int(self.free_slots.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        """Return n slots, or None (and change nothing) when fewer than n are free."""
        if n > self.free_slots.numel():
            return None
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        self.is_free[out] = False
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        slots = slots.to(torch.int64)
        if slots.min() < 1 or slots.max() > self.size:
            raise ValueError("free(): slot index out of range")
        if bool(self.is_free[slots].any()) or slots.unique().numel() != slots.numel():
            raise RuntimeError("free(): slot freed twice")
        self.is_free[slots] = True
        self.free_slots = torch.cat([self.free_slots, slots])


class TokenToKVPool:
    """K/V buffers of shape [layers, size + 1, kv_heads, head_dim] and their slot allocator.

    Buffers are allocated once with torch.empty, so on a CPU the pages are only committed when
    first written and a large pool costs resident memory as it fills. Every slot is written before
    it is read, except the padding slot 0, which is zeroed (masked reads must not meet NaN).
    """

    def __init__(self, size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device="cpu"):
        shape = (num_layers, size + 1, num_kv_heads, head_dim)
        self.k_buffer = torch.empty(shape, dtype=dtype, device=device)
        self.v_buffer = torch.empty(shape, dtype=dtype, device=device)
        self.k_buffer[:, 0].zero_()
        self.v_buffer[:, 0].zero_()
        self.allocator = SlotAllocator(size)
        self.size = size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def alloc(self, n: int) -> torch.Tensor | None:
        return self.allocator.alloc(n)

    def free(self, slots: torch.Tensor) -> None:
        self.allocator.free(slots)

    def available(self) -> int:
        return self.allocator.available()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffer[layer].index_copy_(0, slots, k)
        self.v_buffer[layer].index_copy_(0, slots, v)


class ReqToTokenPool:
    """Rows of the request-to-token table: `table[row, pos]` is the KV slot of a request's position."""

    def __init__(self, max_requests: int, max_context: int, device="cpu"):
        self.table = torch.zeros((max_requests, max_context), dtype=torch.int64, device=device)
        self.free_rows = list(range(max_requests - 1, -1, -1))
        self.max_requests = max_requests

    def available(self) -> int:
        return len(self.free_rows)

    def alloc(self) -> int | None:
        return self.free_rows.pop() if self.free_rows else None

    def free(self, row: int) -> None:
        if row in self.free_rows:
            raise RuntimeError(f"request row {row} freed twice")
        self.free_rows.append(row)
