"""Every Triton kernel against its torch reference on random inputs. On a CPU the kernels run under
Triton's interpreter (small shapes, float32); on a GPU the same tests run compiled, in float16."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before arborlm.kernels defines the kernels

import pytest

from arborlm import kernels as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
TOL = {torch.float32: 1e-4, torch.float16: 5e-3}[DTYPE]
# (query heads, KV heads, head dim): GQA groups of 1, 4 and 6 (not a power of two), a head dim of 24.
HEADS = [(4, 4, 32), (8, 2, 16), (6, 1, 24)]


def close(a, b, tol=TOL):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def paged_pool(lens, kv_heads, head_dim, rows=16, context=64):
    """K/V buffers with slot 0 as padding, and a request-to-token table whose requests sit on scattered
    rows and own scattered slots (so any indexing slip reads the wrong data)."""
    size = sum(lens) + 1
    k_buf = torch.randn(size, kv_heads, head_dim, device=DEVICE, dtype=DTYPE)
    v_buf = torch.randn(size, kv_heads, head_dim, device=DEVICE, dtype=DTYPE)
    table = torch.zeros(rows, context, dtype=torch.int64, device=DEVICE)
    req_rows = torch.randperm(rows)[: len(lens)].to(DEVICE)
    slots = (torch.randperm(size - 1) + 1).to(DEVICE)
    at = 0
    for r, n in zip(req_rows.tolist(), lens):
        table[r, :n] = slots[at : at + n]
        at += n
    return k_buf, v_buf, table, req_rows


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEADS)
def test_decode_attention(heads, kv_heads, head_dim, num_splits):
    torch.manual_seed(0)
    lens = [1, 17, 40, 33]  # ragged, not multiples of the block, and one shorter than the splits
    k_buf, v_buf, table, rows = paged_pool(lens, kv_heads, head_dim)
    q = torch.randn(len(lens), heads, head_dim, device=DEVICE, dtype=DTYPE)
    seq_lens = torch.tensor(lens, device=DEVICE)
    args = (q, k_buf, v_buf, table, rows, seq_lens, head_dim**-0.5)
    close(K.decode_attention(*args, num_splits=num_splits, block_n=16), K.decode_attention_ref(*args))


@pytest.mark.parametrize("heads,kv_heads,head_dim", HEADS)
def test_extend_attention(heads, kv_heads, head_dim):
    torch.manual_seed(0)
    prefix = [0, 23, 16, 0, 40]
    ext = [5, 17, 1, 33, 16]
    k_buf, v_buf, table, rows = paged_pool(prefix, kv_heads, head_dim)
    T = sum(ext)
    q = torch.randn(T, heads, head_dim, device=DEVICE, dtype=DTYPE)
    k = torch.randn(T, kv_heads, head_dim, device=DEVICE, dtype=DTYPE)
    v = torch.randn(T, kv_heads, head_dim, device=DEVICE, dtype=DTYPE)
    starts = torch.tensor([0, *ext[:-1]], device=DEVICE).cumsum(0)
    args = (q, k, v, k_buf, v_buf, table, rows, torch.tensor(prefix, device=DEVICE), starts,
            torch.tensor(ext, device=DEVICE), head_dim**-0.5, max(ext))
    close(K.extend_attention(*args, block_m=16, block_n=16), K.extend_attention_ref(*args))


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("width", [64, 100])
def test_rmsnorm(width, with_residual):
    torch.manual_seed(0)
    x = torch.randn(7, width, device=DEVICE, dtype=DTYPE) * 3
    w = torch.randn(width, device=DEVICE, dtype=DTYPE)
    r = torch.randn(7, width, device=DEVICE, dtype=DTYPE) if with_residual else None
    out, ref = K.rmsnorm(x, w, 1e-5, residual=r), K.rmsnorm_ref(x, w, 1e-5, residual=r)
    if with_residual:
        close(out[1], ref[1], tol=0)  # x + residual, rounded the same way
        out, ref = out[0], ref[0]
    close(out, ref)


def test_rope_rotates_strided_q_and_k_in_place():
    torch.manual_seed(0)
    T, H, Hkv, D = 9, 4, 2, 32
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=DEVICE, dtype=DTYPE)  # as the fused projection gives it
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(64, dtype=torch.float32), inv_freq)
    cos, sin = (torch.cat([freqs, freqs], -1).cos().to(DEVICE, DTYPE), torch.cat([freqs, freqs], -1).sin().to(DEVICE, DTYPE))
    positions = torch.randint(0, 64, (T,), device=DEVICE)
    views = lambda t: (t[:, : H * D].view(T, H, D), t[:, H * D : (H + Hkv) * D].view(T, Hkv, D))
    ours, ref = qkv.clone(), qkv.clone()
    K.rope(*views(ours), cos, sin, positions)
    K.rope_ref(*views(ref), cos, sin, positions)
    close(ours, ref)
    close(ours[:, (H + Hkv) * D :], qkv[:, (H + Hkv) * D :], tol=0)  # v is left alone


@pytest.mark.parametrize("block", [64, 1024])
def test_silu_and_mul(block):
    torch.manual_seed(0)
    x = torch.randn(5, 200, device=DEVICE, dtype=DTYPE) * 4
    close(K.silu_and_mul(x, block=block), K.silu_and_mul_ref(x))
