"""The group-32 int8 weight-only linear (csrc/int8_linear.cpp, the LM head's decode form) against its
torch reference; Q8_0 values quantise back exactly; the model's head uses it only where the plan
quantises, and a compiled decode step runs it without recompiling."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from arborlm.runtime.model.execution import plan_execution

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")

ig = pytest.importorskip("arborlm.runtime.model.layers.int8_group")
from arborlm.runtime.model.layers.linear import Linear  # noqa: E402

GROUP = ig.GROUP


def q8_0_like(n, k, seed=0):
    """A tensor as transformers dequantises a GGUF Q8_0 one: q * d per block of 32, d fp16, with a
    +-127 in every block (llama.cpp maps a block's max |w| to 127)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k // GROUP, GROUP), generator=g, dtype=torch.int32)
    at = torch.randint(0, GROUP, (n, k // GROUP, 1), generator=g)
    sign = torch.randint(0, 2, (n, k // GROUP, 1), generator=g) * 2 - 1
    q.scatter_(-1, at, (127 * sign).int())
    d = (torch.rand(n, k // GROUP, 1, generator=g) * 0.02 + 1e-4).half().float()
    return (q * d).view(n, k), q.view(n, k).to(torch.int8), d.view(n, k // GROUP)


def test_q8_0_values_round_trip_exactly():
    w, q, d = q8_0_like(77, 256)
    q2, d2 = ig.quantize_int8_group32(w)
    assert q2.dtype == torch.int8 and d2.dtype == torch.float32 and d2.shape == (77, 256 // GROUP)
    assert torch.equal(q2, q)
    assert torch.equal(d2, d)
    assert torch.equal(ig.dequantize_int8_group32(q2, d2), w)
    # and once more: the dequantised weight is a fixed point
    q3, d3 = ig.quantize_int8_group32(ig.dequantize_int8_group32(q2, d2))
    assert torch.equal(q3, q) and torch.equal(d3, d)


def test_round_to_nearest_error_is_at_most_half_a_step():
    w = torch.randn(40, 96)
    w[0, :GROUP] = 0  # an all-zero block: scale 0, q 0
    q, d = ig.quantize_int8_group32(w)
    assert bool((q[0, :GROUP] == 0).all()) and d[0, 0] == 0
    err = (ig.dequantize_int8_group32(q, d) - w).abs().view(40, -1, GROUP).amax(-1)
    assert bool((err <= d / 2 + 1e-7).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 11])  # 11: more than one pass of 8 x rows
@pytest.mark.parametrize("nk", [(1, 32), (5, 64), (333, 96), (1027, 576)])  # odd N, tails of the row blocking
def test_op_matches_reference(dtype, rows, nk):
    n, k = nk
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w, _, _ = q8_0_like(n, k, seed=n)
    q, d = ig.quantize_int8_group32(w)
    x = torch.randn(rows, k, generator=g).to(dtype)
    y = ig.int8_group_linear(x, q, d)
    ref = ig.int8_group_linear_ref(x, q, d)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    torch.testing.assert_close(y, ref, atol=1e-5 * k**0.5, rtol=1e-5)


def test_op_takes_rows_of_a_wider_tensor_and_empty_batches():
    w, _, _ = q8_0_like(50, 64)
    q, d = ig.quantize_int8_group32(w)
    wide = torch.randn(3, 160).bfloat16()
    x = wide[:, 32:96]  # row stride 160
    torch.testing.assert_close(ig.int8_group_linear(x, q, d), ig.int8_group_linear_ref(x, q, d), atol=1e-5, rtol=1e-5)
    assert ig.int8_group_linear(torch.empty(0, 64), q, d).shape == (0, 50)


def test_bad_shapes_and_dtypes_are_refused_by_name():
    w, _, _ = q8_0_like(16, 64)
    q, d = ig.quantize_int8_group32(w)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="x has K=48"):
        ig.int8_group_linear(torch.randn(2, 48), q, d)
    with pytest.raises(RuntimeError, match="multiple of the group size"):
        ig.int8_group_linear(torch.randn(2, 40), torch.zeros(16, 40, dtype=torch.int8), torch.zeros(16, 1))
    with pytest.raises(RuntimeError, match="qweight must be a contiguous int8"):
        ig.int8_group_linear(x, q.int(), d)
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32"):
        ig.int8_group_linear(x, q, d[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32"):
        ig.int8_group_linear(x, q, d.bfloat16())
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ig.int8_group_linear(x[0], q, d)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        ig.int8_group_linear(x.int(), q, d)
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        ig.int8_group_linear(torch.randn(64, 2).t(), q, d)
    with pytest.raises(ValueError, match="multiple of 32"):
        ig.quantize_int8_group32(torch.randn(4, 40))


@pytest.mark.parametrize("rows", [1, 4, 9])
def test_linear_int8_group_form(rows):
    plan = plan_execution(torch.bfloat16, "int4", compile_decode=False)
    w, _, _ = q8_0_like(96, 128, seed=3)
    lin = Linear(w, None, plan, form="int8_group")
    assert lin.form == "int8_group"
    # the dense weight (batches, the tied embedding) is the same Q8_0 values, in the activation dtype
    assert torch.equal(lin.weight, w.to(plan.act_dtype))
    x = torch.randn(rows, 128).to(plan.act_dtype)
    out = lin(x)
    if rows <= plan.small_rows:  # the kernel: float32 logits with the exact weights
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, F.linear(x.float(), w), atol=1e-4, rtol=1e-5)
    else:  # the dense weight (bf16 GEMM: its blocking, and so its rounding, may follow the thread count)
        torch.testing.assert_close(out, F.linear(x, lin.weight), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(lin.forward_quantized(x).float(), F.linear(x, lin.weight).float(), atol=5e-2, rtol=2e-2)


def test_linear_int8_group_needs_whole_groups():
    plan = plan_execution(torch.bfloat16, "int4", compile_decode=False)
    lin = Linear(torch.randn(16, 40), None, plan, form="int8_group")
    assert lin.form == "none" and not hasattr(lin, "qweight")


def test_compiled_decode_with_int8_head_never_recompiles(tiny_model_dir):
    """bf16 + int4 (the default plan): the head takes the int8 group form, its dense weight is the
    embedding, and the compiled decode graph calls the op with no recompile as contexts grow."""
    import torch._dynamo

    from arborlm.runtime import Engine

    from conftest import assert_pool_clean

    prompt = list(range(100, 140))
    sp = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    with Engine(tiny_model_dir, dtype="bfloat16", max_total_tokens=2048, compile_decode=False) as eng:
        m = eng.runner.model
        assert m.plan.quantization == "int4" and m.lm_head.form == "int8_group"
        assert m.embed.data_ptr() == m.lm_head.weight.data_ptr()  # one dense copy, shared
        eager = eng.generate(input_ids=prompt, sampling_params=sp)["output_ids"]
    with Engine(tiny_model_dir, dtype="float32", max_total_tokens=1024, compile_decode=False) as eng:
        assert eng.runner.model.lm_head.form == "none"  # unquantised plans keep the dense head alone
    torch._dynamo.reset()
    with Engine(tiny_model_dir, dtype="bfloat16", max_total_tokens=2048, compile_decode=True,
                compile_in_background=False) as eng:
        graphs = eng.runner.decode_graphs
        eng.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": 2})
        assert graphs.ready == {1}, graphs.failed
        calls = graphs.calls
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = eng.generate(input_ids=prompt, sampling_params=sp)["output_ids"]
        assert graphs.calls - calls == sp["max_new_tokens"] - 1
        assert_pool_clean(eng)
    # bf16: Inductor's fused norms may round differently from the eager fused kernels, so agreement
    # rather than identity; the random-weight model's logits are far from ties
    agree = next((i for i, (a, b) in enumerate(zip(compiled, eager)) if a != b), len(eager))
    assert agree >= 8, (compiled, eager)
