"""The fused C++ CPU layers (RMSNorm + residual, RoPE in place, SiLU-and-mul) against the plain-torch
references in arborlm.kernels: bit-identical in bf16 (they round where torch rounds), to float32
rounding otherwise; and an eager bf16 forward of a tiny model with and without them."""

import os
import shutil

import pytest
import torch

from arborlm import kernels

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")

fc = pytest.importorskip("arborlm.runtime.model.layers.fused_cpu")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def close(a, b, dtype):
    if dtype == torch.bfloat16:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [576, 100])  # 100: not a multiple of the 16-wide partial sums
def test_rmsnorm(dtype, n):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, n, generator=g) * 3).to(dtype)
    r = torch.randn(37, n, generator=g).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    close(fc.rmsnorm(x, w, 1e-5), kernels.rmsnorm_ref(x, w, 1e-5), dtype)
    y, s = fc.rmsnorm(x, w, 1e-5, residual=r)
    y_ref, s_ref = kernels.rmsnorm_ref(x, w, 1e-5, residual=r)
    assert torch.equal(s, s_ref)
    close(y, y_ref, dtype)
    # rows of a strided view (a slice of a wider activation)
    wide = torch.randn(37, 2 * n, generator=g).to(dtype)
    close(fc.rmsnorm(wide[:, :n], w, 1e-5), kernels.rmsnorm_ref(wide[:, :n], w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_rotates_q_and_k_in_place_inside_qkv(dtype):
    g = torch.Generator().manual_seed(1)
    T, H, Hkv, D = 29, 9, 3, 64
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).to(dtype)
    cos, sin = torch.randn(100, D, generator=g).to(dtype), torch.randn(100, D, generator=g).to(dtype)
    pos = torch.randint(0, 100, (T,), generator=g)
    a, b = qkv.clone(), qkv.clone()
    for t, ops in ((a, fc), (b, kernels)):
        rope = ops.rope if ops is fc else kernels.rope_ref
        rope(t[:, : H * D].view(T, H, D), t[:, H * D : (H + Hkv) * D].view(T, Hkv, D), cos, sin, pos)
    close(a, b, dtype)
    assert torch.equal(a[:, (H + Hkv) * D :], qkv[:, (H + Hkv) * D :])  # v untouched


def test_rope_refuses_positions_past_the_table():
    q, k = torch.zeros(2, 1, 8), torch.zeros(2, 1, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        fc.rope(q, k, torch.zeros(4, 8), torch.zeros(4, 8), torch.tensor([0, 4]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(41, 2 * 300, generator=g) * 6).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamp and its zero
    close(fc.silu_and_mul(x), kernels.silu_and_mul_ref(x), dtype)


def test_bf16_eager_forward_is_the_same_with_the_fused_layers(tiny_model_dir):
    """The engine's prefill with the C++ layers gives the unfused forward's logits exactly (bf16)."""
    from arborlm.runtime.engine import Engine

    eng = Engine(tiny_model_dir, dtype="bfloat16", quantization="none", compile_decode=False,
                 attention_backend="cpu", max_total_tokens=512, disable_radix_cache=True)
    try:
        model = eng.core.runner.model
        from arborlm.runtime.model.execution import cpu_has_native_bf16

        if not cpu_has_native_bf16():  # AVX2-only: bf16 computes in fp32 there, with torch's ops
            assert model.dtype == torch.float32 and not model.cpu_fused
            return
        assert model.cpu_fused
        prompt = list(range(3, 40))
        out = []
        for fused in (True, False):
            model.cpu_fused = fused
            r = eng.generate(input_ids=prompt, sampling_params=dict(max_new_tokens=6, temperature=0),
                             return_logprob=True, logprob_start_len=0)
            out.append(r)
        a, b = out
        assert a["meta_info"]["input_token_logprobs"] == b["meta_info"]["input_token_logprobs"]
        assert a["output_ids"] == b["output_ids"]
    finally:
        eng.shutdown()
