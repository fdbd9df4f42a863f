"""What one forward step computes: a ragged batch of extends (prefill chunks) followed by decodes.

Built by the model runner from the scheduler's batch; read by the model and the attention backend.
A decode is an extend of one token whose prefix is in the KV pool; keeping the decodes last lets
the attention backend run them as one padded batched call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] token ids of all new tokens, request after request
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] KV slots the new tokens are written to
    # Extend part (first): per request, where its tokens start in T, how many, and its cached prefix.
    extend_starts: list[int]
    extend_lens: list[int]
    extend_prefix_lens: list[int]
    extend_slots: list[torch.Tensor]  # per extend request with a prefix: slots of prefix + new tokens
    # Decode part (last num_decode tokens): a padded gather index over the pool and its mask.
    num_decode: int
    decode_slots: torch.Tensor | None  # [B, L] slot per position, padded with slot 0 (torch backend only)
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True where valid; None when no padding
    logit_idx: torch.Tensor  # indices into T whose logits are needed
    # When all decodes share their first P slots (siblings of one cached prefix), those are read
    # once for the whole batch and decode_slots/decode_mask cover only the rest (cascade attention).
    decode_prefix_slots: torch.Tensor | None = None
    # The same requests as rows of the request-to-token table, for backends that read the pool
    # through it (Triton): the table, each request's row, and its length (prefix + new tokens).
    req_to_token: torch.Tensor | None = None
    req_rows: torch.Tensor | None = None  # [num requests]
    seq_lens: torch.Tensor | None = None  # [num requests]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())
