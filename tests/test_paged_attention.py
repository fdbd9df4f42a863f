"""The CPU paged attention kernels (C++ extension) against plain gather + SDPA on random pools, the
backend against TorchAttentionBackend, and a compiled decode step that must not recompile as
sequences grow. The extension is built on first use (~30 s cold, cached afterwards)."""

import os
import shutil

import pytest
import torch

from arborlm.runtime.cache.memory_pool import TokenToKVPool
from arborlm.runtime.model.attention import TorchAttentionBackend
from arborlm.runtime.model.forward_batch import ForwardBatch

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")

pa = pytest.importorskip("arborlm.runtime.model.layers.paged_attention")

SHAPES = [(9, 3, 64), (6, 2, 16)]  # SmolLM2's (H, Hkv, D), and a small GQA one
ODD_SHAPES = [(4, 4, 24), (16, 2, 128)]  # D not a multiple of 16 (tile copy path); G = 8 (transposed path)
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


@pytest.fixture(scope="module", autouse=True)
def built():
    pa.load_extension()


def make_pool(hkv, d, dtype, lens, prefix=0, layers=2, scattered=True, seed=0):
    """A pool whose requests own `lens` slots each (the first `prefix` shared by all), placed at
    random (scattered) or consecutive slots, in rows of a request table bigger than needed."""
    g = torch.Generator().manual_seed(seed)
    size = prefix + sum(n - prefix for n in lens) + 7
    kb = torch.randn(layers, size + 1, hkv, d, generator=g).to(dtype)
    vb = torch.randn(layers, size + 1, hkv, d, generator=g).to(dtype)
    kb[:, 0] = 0
    vb[:, 0] = 0
    order = torch.randperm(size, generator=g) + 1 if scattered else torch.arange(1, size + 1)
    table = torch.zeros(len(lens) + 3, max(lens) + 5, dtype=torch.int64)
    rows = torch.randperm(len(lens) + 3, generator=g)[: len(lens)]
    shared, at = order[:prefix], prefix
    for r, n in zip(rows.tolist(), lens):
        table[r, :prefix] = shared
        table[r, prefix:n] = order[at : at + n - prefix]
        at += n - prefix
    return kb, vb, table, rows, torch.tensor(lens)


def check_decode(h, hkv, d, dtype, lens, prefix=0, q_dtype=None, layer=1, scattered=True):
    kb, vb, table, rows, seq = make_pool(hkv, d, dtype, lens, prefix, scattered=scattered)
    q = torch.randn(len(lens), h, d).to(q_dtype or dtype)
    scale = d**-0.5
    out = pa.decode_attention(q, kb, vb, layer, table, rows, seq, torch.tensor(prefix), scale)
    ref = pa.decode_attention_ref(q.float(), kb.float(), vb.float(), layer, table, rows, seq, prefix, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_batch1(shape, dtype):
    for n in (1, 5, 300, 1100):  # 1100 is split across threads and merged
        check_decode(*shape, dtype, [n])
    check_decode(*shape, dtype, [1000], scattered=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_ragged_batch33(shape, dtype):
    lens = [1, 5, 300, 1030, 2, 77, 31, 33, 64, 129, 500] * 3
    check_decode(*shape, dtype, lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prefix", [64, 700])
def test_decode_cascade_prefix(shape, dtype, prefix):
    """Requests sharing their first `prefix` slots, each with an own suffix of a different length."""
    own = [1, 2, 9, 40, 150, 33, 64, 7, 300, 5, 1] * 3
    check_decode(*shape, dtype, [prefix + n for n in own], prefix=prefix)
    check_decode(*shape, dtype, [prefix + 3], prefix=prefix)  # cascade at batch 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_decode_odd_shapes(shape, dtype):
    check_decode(*shape, dtype, [1, 17, 250, 600])
    check_decode(*shape, dtype, [100 + n for n in (1, 40, 3)], prefix=100)


def test_decode_float32_queries_on_bf16_pool():
    """q is split into two bf16 halves for the bf16 dot products: still float32-accurate scores."""
    kb, vb, table, rows, seq = make_pool(3, 64, torch.bfloat16, [700, 5, 90])
    q = torch.randn(3, 9, 64)
    out = pa.decode_attention(q, kb, vb, 0, table, rows, seq, torch.tensor(0), 0.125)
    ref = pa.decode_attention_ref(q, kb.float(), vb.float(), 0, table, rows, seq, 0, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_decode_reads_strided_queries():
    """The model hands q as a view into the fused qkv projection (rows strided)."""
    kb, vb, table, rows, seq = make_pool(3, 64, torch.float32, [40, 300])
    qkv = torch.randn(2, 15, 64)
    q = qkv[:, :9]
    out = pa.decode_attention(q, kb, vb, 0, table, rows, seq, torch.tensor(0), 0.125)
    ref = pa.decode_attention_ref(q, kb, vb, 0, table, rows, seq, 0, 0.125)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def check_extend(h, hkv, d, dtype, prefix, n):
    kb, vb, table, rows, _ = make_pool(hkv, d, dtype, [prefix + n, 50])
    q = torch.randn(n, h, d).to(dtype)
    row = int(rows[0])
    out = pa.extend_attention(q, kb, vb, 1, table, row, prefix, d**-0.5)
    ref = pa.extend_attention_ref(q.float(), kb.float(), vb.float(), 1, table, row, prefix, d**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + ODD_SHAPES)
def test_extend_matches_reference(shape, dtype):
    for prefix in (0, 1, 500):
        for n in (1, 7, 40):
            check_extend(*shape, dtype, prefix, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write(dtype):
    kb, vb, _, _, _ = make_pool(3, 64, dtype, [100])
    kb2, vb2 = kb.clone(), vb.clone()
    slots = torch.randperm(100)[:37] + 1
    kv = torch.randn(37, 2 * 3 + 9, 64).to(dtype)  # k/v as strided views, as the model makes them
    k, v = kv[:, 9:12], kv[:, 12:]
    pa.kv_write(kb, vb, 1, slots, k, v)
    pa.kv_write_ref(kb2, vb2, 1, slots, k, v)
    assert torch.equal(kb, kb2) and torch.equal(vb, vb2)


def test_bad_inputs_raise():
    kb, vb, table, rows, seq = make_pool(3, 64, torch.float32, [10])
    q = torch.randn(1, 9, 64)
    with pytest.raises(RuntimeError, match="seq_len"):
        pa.decode_attention(q, kb, vb, 0, table, rows, seq + 1000, torch.tensor(0), 0.125)
    table[rows[0], 3] = kb.shape[1] + 5
    with pytest.raises(RuntimeError, match="out of range"):
        pa.decode_attention(q, kb, vb, 0, table, rows, seq, torch.tensor(0), 0.125)
    with pytest.raises(RuntimeError, match="out of range"):
        pa.kv_write(kb, vb, 0, torch.tensor([kb.shape[1]]), q[:, :3], q[:, :3])


def mixed_batch(dtype, H, Hkv, D, cascade=False):
    """Two extends (the second on a cached prefix) then three decodes, laid out as
    ModelRunner.prepare_inputs lays them out; with `cascade`, only decodes sharing a prefix."""
    torch.manual_seed(0)
    if cascade:
        prefix, new = [80 + n for n in (3, 10, 1)], [1, 1, 1]
    else:
        prefix, new = [0, 200, 20, 5, 70], [6, 4, 1, 1, 1]
    ends = [p + n for p, n in zip(prefix, new)]
    n_ext = 0 if cascade else 2
    pool = TokenToKVPool(sum(ends) + 10, 2, Hkv, D, dtype)
    pool.k_buffer[:, 1:].normal_()
    pool.v_buffer[:, 1:].normal_()
    table = torch.zeros(8, 256, dtype=torch.int64)
    rows = torch.tensor([5, 0, 3, 7, 1][: len(ends)])
    slots = torch.randperm(sum(ends) + 10)[: sum(ends)] + 1
    for r, e, at in zip(rows.tolist(), ends, torch.tensor([0, *ends[:-1]]).cumsum(0).tolist()):
        table[r, :e] = slots[at : at + e]
    shared = 80 if cascade else 0
    if cascade:
        for r in rows.tolist():
            table[r, :shared] = table[rows[0], :shared]
    T = sum(new)
    q, k, v = (torch.randn(T, h, D).to(dtype) for h in (H, Hkv, Hkv))
    d_ends = torch.tensor(ends[n_ext:])
    L = int(d_ends.max()) - shared
    valid = torch.arange(L) < (d_ends - shared).unsqueeze(1)
    batch = ForwardBatch(
        input_ids=torch.zeros(T, dtype=torch.int64), positions=torch.zeros(T, dtype=torch.int64),
        out_slots=torch.cat([table[r, p:e] for r, p, e in zip(rows.tolist(), prefix, ends)]),
        extend_starts=[0, 6][:n_ext], extend_lens=new[:n_ext], extend_prefix_lens=prefix[:n_ext],
        extend_slots=[None, table[rows[1], : ends[1]]][:n_ext], num_decode=3,
        decode_slots=table[rows[n_ext:], shared : shared + L].masked_fill(~valid, 0),
        decode_mask=None if bool(valid.all()) else valid[:, None, None, :], logit_idx=torch.arange(T),
        decode_prefix_slots=table[rows[0], :shared] if cascade else None,
        req_to_token=table, req_rows=rows, seq_lens=torch.tensor(ends),
    )
    return pool, batch, q, k, v


@pytest.mark.parametrize(
    "dtype,cascade,gather",
    [(torch.float32, False, False), (torch.float32, True, False), (torch.bfloat16, False, False),
     (torch.bfloat16, True, False), (torch.bfloat16, False, True)],
)
def test_backend_matches_torch_backend(dtype, cascade, gather):
    """`gather`: the prefixed extend takes the gather + SDPA path long bf16 extends take."""
    H, Hkv, D = 9, 3, 64
    pool, batch, q, k, v = mixed_batch(dtype, H, Hkv, D, cascade)
    pool2 = TokenToKVPool(pool.size, 2, Hkv, D, dtype)
    pool2.k_buffer.copy_(pool.k_buffer)
    pool2.v_buffer.copy_(pool.v_buffer)
    backend = pa.CpuPagedAttentionBackend(pool, H, Hkv, D)
    if gather:
        backend.extend_max_rows = 0
    with torch.inference_mode():
        ref = TorchAttentionBackend(pool2, H, Hkv, D).forward(q, k, v, 1, batch)
        out = backend.forward(q, k, v, 1, batch)
        again = backend.forward(q, k, v, 1, batch)  # the per-step metadata is reused
    assert torch.equal(pool.k_buffer, pool2.k_buffer) and torch.equal(pool.v_buffer, pool2.v_buffer)
    assert out.shape == (q.shape[0], H * D) and torch.equal(out, again)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def test_compiled_decode_step_does_not_recompile_as_sequences_grow():
    """The op is opaque to torch.compile: its fake kernel shapes the output like q, and lengths and
    the cascade prefix are tensors, so 50 steps of growing sequences run one compiled graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    H, Hkv, D, B = 9, 3, 64, 4
    kb, vb, table, rows, _ = make_pool(Hkv, D, torch.float32, [300] * B, prefix=64)
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, kb, vb, table, rows, lens, prefix):
        o = pa.decode_attention(q, kb, vb, 1, table, rows, lens, prefix, D**-0.5)
        return o.flatten(1) * 2.0

    lens = torch.full((B,), 100)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(50):
            lens += torch.tensor([1, 2, 1, 3])
            prefix = torch.tensor(64 if i % 2 else 0)
            q = torch.randn(B, H, D)
            out = step(q, kb, vb, table, rows, lens, prefix)
            ref = pa.decode_attention_ref(q, kb, vb, 1, table, rows, lens, 0, D**-0.5).flatten(1) * 2.0
            torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert counter.frame_count == 1


def test_engine_greedy_tokens_match_torch_backend(tiny_model_dir, monkeypatch):
    """The backend swapped into a real engine step loop (batched prefill, extends over a cached
    prefix, cascade decodes of its siblings) gives the torch backend's greedy tokens."""
    from arborlm.runtime import Engine

    seen = {"cascade": 0, "extend": 0}
    decode, extend = pa.decode_attention, pa.extend_attention

    def counting_decode(*args):
        seen["cascade"] += int(args[7]) > 0
        return decode(*args)

    def counting_extend(*args):
        seen["extend"] += 1
        return extend(*args)

    monkeypatch.setattr(pa, "decode_attention", counting_decode)
    monkeypatch.setattr(pa, "extend_attention", counting_extend)

    prompts = [[1, 504, 3575, 282], list(range(100, 200))]
    forks = [prompts[1] + [5, 6, 7], prompts[1] + [8, 9], prompts[1] + [10], prompts[1] + [11, 12]]
    sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    results = []
    for paged in (False, True):
        with Engine(tiny_model_dir, dtype="float32", max_total_tokens=2048) as eng:
            if paged:
                r, m = eng.runner, eng.runner.model
                r.attn = pa.CpuPagedAttentionBackend(r.kv_pool, m.num_heads, m.num_kv_heads, m.head_dim)
            batched = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]
            forked = eng.generate(input_ids=forks, sampling_params=sp)
            assert all(o["meta_info"]["cached_tokens"] >= 64 for o in forked)
            results.append((batched, [o["output_ids"] for o in forked]))
    assert results[0] == results[1]
    assert seen["cascade"] and seen["extend"]
