"""Weight-only quantised linears against F.linear on their own dequantised weights (no model)."""

import pytest
import torch
import torch.nn.functional as F

from arborlm.runtime.config import EngineArgs
from arborlm.runtime.model.execution import plan_execution
from arborlm.runtime.model.layers.linear import GROUP, Linear, dequantize_int4, quantize_int4


def q4_1_like(n, k, seed=0):
    """A tensor as transformers dequantises a GGUF Q4_1 one: q * d + m, d and m fp16, per 32."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's Q4_1 maps a block's min to 0 and its max to 15
    d = (torch.rand(n, k // GROUP, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (-8 * d + torch.randn(n, k // GROUP, 1, generator=g) * 1e-3).half().float()
    return (q * d + m).view(n, k), q.view(n, k).to(torch.int32)


def test_int4_recovers_q4_1_values_exactly():
    w, q = q4_1_like(64, 128)
    q2, scale, lo = quantize_int4(w)
    assert torch.equal(q2, q)
    assert torch.allclose(dequantize_int4(q2, scale, lo), w, rtol=0, atol=1e-7)


def test_int4_round_to_nearest_error_is_at_most_half_a_step():
    w = torch.randn(32, 96)
    q, scale, lo = quantize_int4(w)
    err = (dequantize_int4(q, scale, lo) - w).abs().view(32, -1, GROUP).amax(-1)
    assert bool((err <= scale / 2 + 1e-6).all())


@pytest.mark.parametrize("form", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_quantised_linear_matches_f_linear_on_its_dequantised_weight(form, dtype, rows):
    torch.manual_seed(rows)
    plan = plan_execution(dtype, form, compile_decode=False)
    w, b = torch.randn(208, 128) * 0.05, torch.randn(208) * 0.1
    lin = Linear(w, b, plan)
    assert lin.form == form
    x = torch.randn(rows, 128).to(plan.act_dtype)
    ref = F.linear(x.float(), lin.dequantized(), b.to(plan.act_dtype).float())
    out = lin(x)
    assert out.dtype == plan.act_dtype
    # the quantised kernel takes bf16 activations; the dense path computes in the activation dtype
    tol = 3e-2 if rows <= plan.small_rows or dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(out.float(), ref, atol=tol, rtol=tol), (out.float() - ref).abs().max()
    # whatever the path, the same weights: the quantised kernel agrees with the dense one
    assert torch.allclose(lin.forward_quantized(x).float(), F.linear(x, lin.weight, lin.bias).float(), atol=3e-2)


def test_int4_dense_copy_is_the_int4_weight():
    w, _ = q4_1_like(64, 64, seed=2)
    lin = Linear(w, None, plan_execution(torch.float32, "int4", compile_decode=False))
    # bf16 rounding of scale and zero is the only change to the Q4_1 values: a few % of a step
    _, scale, _ = quantize_int4(w)
    err = (lin.dequantized() - w).abs().view(64, -1, GROUP).amax(-1)
    assert bool((err <= 0.05 * scale).all()), (err / scale).max()


def test_layers_int4_cannot_hold_stay_dense():
    lin = Linear(torch.randn(16, 40), None, plan_execution(torch.bfloat16, "int4", compile_decode=False))
    assert lin.form == "none"  # 40 input features are not whole groups of 32


def test_default_quantization_per_dtype_and_bad_values():
    assert plan_execution(torch.float32, None).quantization == "none"
    assert plan_execution(torch.bfloat16, None).quantization == "int4"
    with pytest.raises(ValueError, match="quantization"):
        plan_execution(torch.bfloat16, "int3")
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(quantization="fp4")
