"""Decode attention per layer call: the in-place paged C++ kernel (CpuPagedAttentionBackend) against
the torch backend (gather the context out of the pool, then SDPA), on SmolLM2-135M's attention shape.

Both are timed through `backend.forward(q, k, v, layer, batch)`, which also writes the step's k/v
to the pool, so a row is what one layer of one decode step costs. Successive calls walk the layers
of a --layers deep pool, as a model step does, so the KV is read from memory rather than from a
cache kept warm by repeating one layer (--layers 1 shows that cache-resident case). Slots are handed
out by the pool's allocator as in serving (each request's context mostly contiguous). Usage:

    python benchmarks/bench_paged_attention.py [--threads N] [--reps 9] [--layers 30] [--dtype bf16 fp32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from arborlm.runtime.cache.memory_pool import ReqToTokenPool, TokenToKVPool
from arborlm.runtime.model.attention import TorchAttentionBackend
from arborlm.runtime.model.execution import cpu_flags
from arborlm.runtime.model.forward_batch import ForwardBatch
from arborlm.runtime.model.layers.paged_attention import CpuPagedAttentionBackend, load_extension

H, HKV, D = 9, 3, 64  # SmolLM2-135M
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_flag_summary() -> str:
    flags = cpu_flags()
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return " ".join(f"{w}={'yes' if w in flags else 'no'}" for w in wanted)


def make_case(batch: int, ctx: int, shared: int, dtype, layers: int, seed: int = 0):
    """A pool holding `batch` decoding requests of about `ctx` tokens each (their own part ragged by
    +-10% when batched), the first `shared` slots common to all; returns pool, q/k/v and the batch."""
    g = torch.Generator().manual_seed(seed)
    own = [ctx] if batch == 1 else [max(2, ctx + int(torch.randint(-ctx // 10, ctx // 10 + 1, (1,), generator=g))) for _ in range(batch)]
    total = shared + sum(own) + 16
    pool = TokenToKVPool(total, layers, HKV, D, dtype)
    pool.k_buffer.normal_(generator=g)
    pool.v_buffer.normal_(generator=g)
    reqs = ReqToTokenPool(batch + 1, shared + max(own) + 1)
    prefix = pool.alloc(shared) if shared else torch.empty(0, dtype=torch.int64)
    rows, lens = [], []
    for n in own:
        r = reqs.alloc()
        reqs.table[r, :shared] = prefix
        reqs.table[r, shared : shared + n] = pool.alloc(n)
        rows.append(r)
        lens.append(shared + n)
    rows_t, lens_t = torch.tensor(rows), torch.tensor(lens)
    # The torch backend's inputs, built as ModelRunner.prepare_inputs does.
    own_t = lens_t - shared
    L = int(own_t.max())
    slots = reqs.table[rows_t, shared : shared + L]
    mask = None
    if int(own_t.min()) != L:
        valid = torch.arange(L).unsqueeze(0) < own_t.unsqueeze(1)
        slots = slots.masked_fill(~valid, 0)
        mask = valid[:, None, None, :]
    out_slots = reqs.table[rows_t, lens_t - 1]
    fb = ForwardBatch(
        input_ids=torch.zeros(batch, dtype=torch.int64), positions=lens_t - 1, out_slots=out_slots,
        extend_starts=[], extend_lens=[], extend_prefix_lens=[], extend_slots=[], num_decode=batch,
        decode_slots=slots, decode_mask=mask, logit_idx=torch.arange(batch),
        decode_prefix_slots=prefix if shared else None, req_to_token=reqs.table, req_rows=rows_t, seq_lens=lens_t,
    )
    q = torch.randn(batch, H, D, generator=g).to(dtype)
    k = torch.randn(batch, HKV, D, generator=g).to(dtype)
    v = torch.randn(batch, HKV, D, generator=g).to(dtype)
    return pool, fb, q, k, v


def timeit(fn, reps: int, layers: int) -> float:
    """Median seconds per call over `reps` timed groups of calls fn(layer) walking the layers, each
    group at least one pass over them and long enough to swamp timer noise."""
    for i in range(layers):
        fn(i)
    t = time.perf_counter()
    fn(0)
    inner = max(layers, int(5e-3 / max(time.perf_counter() - t, 1e-7)))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(inner):
            fn(i % layers)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=9, help="timed groups per cell; the median is shown (>= 5)")
    ap.add_argument("--layers", type=int, default=30, help="pool depth the calls walk (SmolLM2-135M has 30)")
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    args = ap.parse_args()
    if args.reps < 5:
        ap.error("--reps must be at least 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    load_extension()
    print(f"extension ready in {time.perf_counter() - t:.1f}s; threads={torch.get_num_threads()}; {cpu_flag_summary()}")
    print(f"shape H={H} Hkv={HKV} D={D}; time per layer call (k/v write + attention), walking {args.layers} layers, "
          f"median of {args.reps}\n")
    cases = [(1, 200, 0), (1, 1000, 0), (1, 4000, 0), (32, 200, 0), (32, 200, 1000)]
    print(f"{'dtype':5} {'B':>3} {'ctx (own+shared)':>17} {'torch gather+SDPA':>18} {'paged kernel':>13} {'speedup':>8}")
    with torch.inference_mode():
        for name in args.dtype:
            for b, ctx, shared in cases:
                pool, fb, q, k, v = make_case(b, ctx, shared, DTYPES[name], args.layers)
                ref = TorchAttentionBackend(pool, H, HKV, D)
                new = CpuPagedAttentionBackend(pool, H, HKV, D)
                err = (ref.forward(q, k, v, 0, fb).float() - new.forward(q, k, v, 0, fb).float()).abs().max().item()
                assert err < (2e-2 if name == "bf16" else 1e-4), err
                t_ref = timeit(lambda i: ref.forward(q, k, v, i, fb), args.reps, args.layers)
                t_new = timeit(lambda i: new.forward(q, k, v, i, fb), args.reps, args.layers)
                label = f"{ctx}+{shared}" if shared else f"{ctx}"
                print(f"{name:5} {b:3d} {label:>17} {t_ref * 1e6:15.1f} us {t_new * 1e6:10.1f} us {t_ref / t_new:7.2f}x")


if __name__ == "__main__":
    main()
