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
    assert isinstance(make_attention_backend("auto", pool, 4, 2, 16), TorchAttentionBackend)  # a CPU pool
    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    with pytest.raises(UnsupportedError, match="TRITON_INTERPRET=1"):
        make_attention_backend("triton", pool, 4, 2, 16)
    with pytest.raises(ValueError, match="attention_backend"):
        Engine(attention_backend="flash")
