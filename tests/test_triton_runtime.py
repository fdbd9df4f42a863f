"""The Triton attention backend and fused layers inside the engine give the torch path's greedy
tokens. On a CPU they run under Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch

from arborlm import kernels
from arborlm.runtime import Engine
from arborlm.runtime.cache.memory_pool import TokenToKVPool
from arborlm.runtime.errors import UnsupportedError
from arborlm.runtime.model.attention import TorchAttentionBackend, make_attention_backend

PROMPTS = [[1, 504, 3575, 282], list(range(100, 130))]
SP = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
# The runtime keeps its model and KV pool on the CPU (EngineArgs.device is not wired up yet), which
# compiled kernels cannot read: on a CUDA machine only test_kernels.py exercises them.
needs_cpu_kernels = pytest.mark.skipif(not kernels.interpreted(), reason="runtime tensors are on the CPU; kernels are compiled for CUDA")


def greedy(model_dir, fused=False, **kwargs):
    with Engine(model_dir, dtype="float32", max_total_tokens=1024, **kwargs) as eng:
        eng.runner.model.fused_kernels = fused
        batched = [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=SP)]
        # Extends a cached prefix: the extend kernel's prefix > 0 path.
        longer = eng.generate(input_ids=PROMPTS[1] + [5, 6, 7], sampling_params=SP)
    assert longer["meta_info"]["cached_tokens"] > 0
    return batched, longer["output_ids"]


@pytest.fixture(scope="module")
def torch_tokens(tiny_model_dir):
    return greedy(tiny_model_dir, attention_backend="torch")


@needs_cpu_kernels
def test_triton_attention_backend_matches_torch(tiny_model_dir, torch_tokens):
    assert greedy(tiny_model_dir, attention_backend="triton") == torch_tokens


@needs_cpu_kernels
def test_fused_layers_match_torch(tiny_model_dir, torch_tokens):
    assert greedy(tiny_model_dir, fused=True, attention_backend="torch") == torch_tokens


def test_backend_choice(monkeypatch):
    pool = TokenToKVPool(8, 1, 2, 16, torch.float32)
    from arborlm.runtime.model.layers.paged_attention import CpuPagedAttentionBackend

    assert isinstance(make_attention_backend("auto", pool, 4, 2, 16), CpuPagedAttentionBackend)  # a CPU pool
    assert isinstance(make_attention_backend("torch", pool, 4, 2, 16), TorchAttentionBackend)
    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    with pytest.raises(UnsupportedError, match="TRITON_INTERPRET=1"):
        make_attention_backend("triton", pool, 4, 2, 16)
    with pytest.raises(ValueError, match="attention_backend"):
        Engine(attention_backend="flash")


@needs_cpu_kernels
def test_triton_backend_matches_torch_on_a_mixed_batch():
    """Two extends (one on a cached prefix) then three decodes in one step, as continuous batching mixes them."""
    from arborlm.runtime.model.forward_batch import ForwardBatch
    from arborlm.runtime.model.triton_attention import TritonAttentionBackend

    torch.manual_seed(0)
    H, Hkv, D = 4, 2, 16
    prefix, new = [0, 9, 20, 5, 70], [6, 4, 1, 1, 1]  # the last three are decodes
    ends = [p + n for p, n in zip(prefix, new)]
    pool = TokenToKVPool(sum(ends), 1, Hkv, D, torch.float32)
    pool.k_buffer.normal_()
    pool.v_buffer.normal_()
    table = torch.zeros(8, 128, dtype=torch.int64)
    rows = torch.tensor([5, 0, 3, 7, 1])
    slots = torch.randperm(sum(ends)) + 1
    for r, e, at in zip(rows.tolist(), ends, torch.tensor([0, *ends[:-1]]).cumsum(0).tolist()):
        table[r, :e] = slots[at : at + e]
    T = sum(new)
    q, k, v = torch.randn(T, H, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    L = max(ends[2:])
    valid = torch.arange(L) < torch.tensor(ends[2:]).unsqueeze(1)
    batch = ForwardBatch(
        input_ids=torch.zeros(T, dtype=torch.int64), positions=torch.zeros(T, dtype=torch.int64),
        out_slots=torch.cat([table[r, p:e] for r, p, e in zip(rows.tolist(), prefix, ends)]),
        extend_starts=[0, 6], extend_lens=new[:2], extend_prefix_lens=prefix[:2],
        extend_slots=[None, table[rows[1], : ends[1]]], num_decode=3,
        decode_slots=table[rows[2:], :L].masked_fill(~valid, 0), decode_mask=valid[:, None, None, :],
        logit_idx=torch.arange(T), req_to_token=table, req_rows=rows, seq_lens=torch.tensor(ends),
    )
    ref = TorchAttentionBackend(pool, H, Hkv, D).forward(q, k, v, 0, batch)
    out = TritonAttentionBackend(pool, H, Hkv, D).forward(q, k, v, 0, batch)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
