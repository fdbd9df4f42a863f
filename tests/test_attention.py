"""The torch attention backend against plain per-request attention, on a random paged pool."""

import pytest
import torch
import torch.nn.functional as F

from arborlm.runtime.cache.memory_pool import TokenToKVPool
from arborlm.runtime.model.attention import TorchAttentionBackend
from arborlm.runtime.model.forward_batch import ForwardBatch

H, HKV, D = 6, 2, 16


def reference(q, pool, slots_per_req, layer=0):
    outs = []
    for i, slots in enumerate(slots_per_req):
        k = pool.k_buffer[layer][slots].repeat_interleave(H // HKV, dim=1).transpose(0, 1)  # [H, L, D]
        v = pool.v_buffer[layer][slots].repeat_interleave(H // HKV, dim=1).transpose(0, 1)
        o = F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v, scale=D**-0.5)  # [H, 1, D]
        outs.append(o.squeeze(1).reshape(-1))
    return torch.stack(outs)


@pytest.mark.parametrize("shared", [0, 70])
def test_decode_plain_and_cascade_match_reference(shared):
    torch.manual_seed(0)
    pool = TokenToKVPool(600, 1, HKV, D, torch.float32)
    pool.k_buffer.normal_()
    pool.v_buffer.normal_()
    prefix = torch.randperm(600)[:shared] + 1 if shared else torch.empty(0, dtype=torch.int64)
    lens = [5, 1, 12, 7]
    free = [s for s in range(1, 601) if s not in set(prefix.tolist())]
    own, at = [], 0
    for n in lens:
        own.append(torch.tensor(free[at : at + n]))
        at += n
    L = max(lens)
    slots = torch.zeros(len(lens), L, dtype=torch.int64)
    for i, o in enumerate(own):
        slots[i, : len(o)] = o
    valid = torch.arange(L).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)
    q = torch.randn(len(lens), H, D)
    new = torch.stack([o[-1] for o in own])
    batch = ForwardBatch(
        input_ids=torch.zeros(4, dtype=torch.int64), positions=torch.zeros(4, dtype=torch.int64),
        out_slots=new, extend_starts=[], extend_lens=[], extend_prefix_lens=[], extend_slots=[],
        num_decode=4, decode_slots=slots, decode_mask=valid[:, None, None, :], logit_idx=torch.arange(4),
        decode_prefix_slots=prefix if shared else None,
    )
    backend = TorchAttentionBackend(pool, H, HKV, D)
    k_new, v_new = pool.k_buffer[0][new].clone(), pool.v_buffer[0][new].clone()
    out = backend.forward(q, k_new, v_new, 0, batch)
    ref = reference(q, pool, [torch.cat([prefix, o]) for o in own])
    assert torch.allclose(out, ref, atol=1e-5)
