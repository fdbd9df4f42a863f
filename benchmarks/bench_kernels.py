#!/usr/bin/env python
"""Each Triton kernel of arborlm.kernels against its torch reference on a GPU, and against torch SDPA
on contiguous (unpaged) K/V for the attention kernels.

Per kernel and implementation: the median time (triton.testing.do_bench), and the bytes the kernel
must move at least (inputs read once, outputs written once) over that time, as GB/s and as a share
of the card's peak memory bandwidth when the card is known. The paged pool holds each request's
tokens in scattered slots, as a long-running server's does.

    python benchmarks/bench_kernels.py
    python benchmarks/bench_kernels.py --batch 64 --context 4096 --dtype bfloat16

Without CUDA it prints "no GPU: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

# Peak HBM bandwidth in GB/s by device-name fragment, most specific first.
PEAK_GBPS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("A100-SXM4-80GB", 2039),
             ("A100", 1555)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="decode requests")
    p.add_argument("--context", type=int, default=2048, help="tokens each decode request has")
    p.add_argument("--extend-reqs", type=int, default=4)
    p.add_argument("--prefix", type=int, default=1024, help="cached prefix of each extend request")
    p.add_argument("--extend", type=int, default=512, help="new tokens of each extend request")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=4096, help="RMSNorm width")
    p.add_argument("--intermediate", type=int, default=14336, help="SiLU-and-mul width")
    p.add_argument("--tokens", type=int, default=4096, help="rows of the norm, RoPE and activation cases")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    return p.parse_args(argv)


def peak_gbps(name: str) -> float | None:
    return next((gbps for frag, gbps in PEAK_GBPS if frag in name), None)


def paged(tokens_per_req: list[int], kv_heads, head_dim, dtype, device):
    """A pool holding each request's tokens in scattered slots, with its request-to-token table."""
    total = sum(tokens_per_req)
    k_buf = torch.randn(total + 1, kv_heads, head_dim, dtype=dtype, device=device)
    v_buf = torch.randn_like(k_buf)
    table = torch.zeros(len(tokens_per_req), max(tokens_per_req), dtype=torch.int64, device=device)
    slots = torch.randperm(total, device=device) + 1
    at = 0
    for r, n in enumerate(tokens_per_req):
        table[r, :n] = slots[at : at + n]
        at += n
    return k_buf, v_buf, table, torch.arange(len(tokens_per_req), device=device)


def gather_dense(buf, table, rows, n):
    """[R, Hkv, n, D]: what SDPA needs, built outside the timed region."""
    return buf[table[rows, :n]].permute(0, 2, 1, 3).contiguous()


def decode_cases(a, dt, dev):
    from arborlm import kernels as K

    B, L, H, Hkv, D = a.batch, a.context, a.heads, a.kv_heads, a.head_dim
    k_buf, v_buf, table, rows = paged([L] * B, Hkv, D, dt, dev)
    q = torch.randn(B, H, D, dtype=dt, device=dev)
    lens = torch.full((B,), L, device=dev)
    args = (q, k_buf, v_buf, table, rows, lens, D**-0.5)
    kd, vd, qd = gather_dense(k_buf, table, rows, L), gather_dense(v_buf, table, rows, L), q.unsqueeze(2)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, scale=D**-0.5, enable_gqa=True)
    nbytes = (2 * B * L * Hkv * D + 2 * B * H * D) * q.element_size() + B * L * 8
    name = f"decode B={B} L={L} H={H}/{Hkv} D={D}"
    return [(name, "triton (paged)", lambda: K.decode_attention(*args), nbytes),
            (name, "torch ref (paged)", lambda: K.decode_attention_ref(*args), nbytes),
            (name, "torch SDPA (dense)", sdpa, nbytes)]


def extend_cases(a, dt, dev):
    from arborlm import kernels as K

    N, P, E, H, Hkv, D = a.extend_reqs, a.prefix, a.extend, a.heads, a.kv_heads, a.head_dim
    k_buf, v_buf, table, rows = paged([P + E] * N, Hkv, D, dt, dev)
    q = torch.randn(N * E, H, D, dtype=dt, device=dev)
    k = torch.randn(N * E, Hkv, D, dtype=dt, device=dev)
    v = torch.randn_like(k)
    new_slots = table[:, P:].reshape(-1)  # the new tokens' K/V sit in the pool too, as the runtime writes them
    k_buf[new_slots], v_buf[new_slots] = k, v
    lens = lambda x: torch.full((N,), x, device=dev)
    args = (q, k, v, k_buf, v_buf, table, rows, lens(P), torch.arange(N, device=dev) * E, lens(E), D**-0.5, E)
    kd, vd = gather_dense(k_buf, table, rows, P + E), gather_dense(v_buf, table, rows, P + E)
    qd = q.view(N, E, H, D).transpose(1, 2).contiguous()
    mask = torch.ones(E, P + E, dtype=torch.bool, device=dev).tril(diagonal=P)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=D**-0.5,
                                                                     enable_gqa=True)
    nbytes = (2 * N * E * H * D + 2 * N * (P + E) * Hkv * D) * q.element_size()
    name = f"extend {N}x(prefix {P} + {E}) H={H}/{Hkv} D={D}"
    return [(name, "triton (paged)", lambda: K.extend_attention(*args), nbytes),
            (name, "torch ref (paged)", lambda: K.extend_attention_ref(*args), nbytes),
            (name, "torch SDPA (dense)", sdpa, nbytes)]


def layer_cases(a, dt, dev):
    from arborlm import kernels as K

    T, N, I, H, Hkv, D = a.tokens, a.hidden, a.intermediate, a.heads, a.kv_heads, a.head_dim
    e = torch.finfo(dt).bits // 8
    x, r, w = (torch.randn(T, N, dtype=dt, device=dev), torch.randn(T, N, dtype=dt, device=dev),
               torch.randn(N, dtype=dt, device=dev))
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dt, device=dev)
    q, k = qkv[:, : H * D].view(T, H, D), qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
    cos, sin = torch.rand(8192, D, dtype=dt, device=dev), torch.rand(8192, D, dtype=dt, device=dev)
    pos = torch.randint(0, 8192, (T,), device=dev)
    gu = torch.randn(T, 2 * I, dtype=dt, device=dev)
    cases = []
    for impl, f in (("triton", K.rmsnorm), ("torch ref", K.rmsnorm_ref)):
        cases.append((f"rmsnorm + residual T={T} N={N}", impl, lambda f=f: f(x, w, 1e-5, residual=r), 4 * T * N * e))
    rope_bytes = 2 * T * (H + Hkv) * D * e + T * D * e  # q, k read and written; half of cos and of sin
    for impl, f in (("triton", K.rope), ("torch ref", K.rope_ref)):
        cases.append((f"rope T={T} H={H}/{Hkv} D={D}", impl, lambda f=f: f(q, k, cos, sin, pos), rope_bytes))
    for impl, f in (("triton", K.silu_and_mul), ("torch ref", K.silu_and_mul_ref)):
        cases.append((f"silu_and_mul T={T} I={I}", impl, lambda f=f: f(gu), 3 * T * I * e))
    return cases


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        print("no GPU: skipped")
        return 0
    import triton.testing

    a = parse_args(argv)
    dt, dev = getattr(torch, a.dtype), "cuda"
    name = torch.cuda.get_device_name()
    peak = peak_gbps(name)
    print(f"{name}, {a.dtype}; peak bandwidth {f'{peak} GB/s' if peak else 'unknown'}")
    print(f"| kernel | implementation | median (us) | GB/s | % of peak |\n| --- | --- | ---: | ---: | ---: |")
    torch.manual_seed(0)
    for case, impl, fn, nbytes in [*decode_cases(a, dt, dev), *extend_cases(a, dt, dev), *layer_cases(a, dt, dev)]:
        ms = triton.testing.do_bench(fn, return_mode="median")
        gbps = nbytes / ms / 1e6
        share = f"{100 * gbps / peak:.0f}%" if peak else "-"
        print(f"| {case} | {impl} | {1000 * ms:.1f} | {gbps:.0f} | {share} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
