#!/usr/bin/env python
"""Two replicas on Ray Serve: prefix routing against round-robin, and the Ray path's overhead.

Workload (issue 17): --prefixes distinct ~800-token documents x --per-prefix short questions each,
arrival randomly interleaved, --concurrency requests in flight, 16 new tokens each (greedy), on the
embedded model. Each replica's KV pool is 4000 tokens (--max-total-tokens in the default
--server-args): room for half the documents and the requests in flight, the case routing is for
(more documents than one replica caches); the single server on the mixed load gets twice that, the
two replicas' memory. With the default pool (46k tokens) every replica caches every document, and
round-robin loses only the first prefill of each document on each replica. Every server compiles
its decode graphs for batches up to 16 before serving (--warmup-decode-bs 16, also in the default
--server-args): a replica compiling during the run (at one thread, seconds per batch size, holding
the GIL) would measure its compiler, not its serving. Arms, in one run:

  prefix       arborlm serve --replicas 2 --router prefix
  round-robin  arborlm serve --replicas 2 --router round-robin
  single       arborlm serve (one server), on the same workload and on a single-prefix workload;
               the Ray path runs the single-prefix workload too (prefix routing), for its overhead

Each arm runs --rounds times on a fresh cluster (cold caches); figures are medians over rounds:
throughput (requests/s), TTFT p50/p99 (streamed), and the cached share of prompt tokens (the
sum over replicas of sglang:cached_tokens_total / sglang:prompt_tokens_total from /metrics).

    python benchmarks/bench_cluster.py                   # 8 x 12, 2 rounds per arm
    python benchmarks/bench_cluster.py --rounds 3 --prefixes 8 --per-prefix 12
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak import cpu_info, pct, start_server, stop_server, wait_healthy  # noqa: E402

WORDS = ("river town market bridge harbour winter letter garden station teacher painter morning evening "
         "quiet bright stone forest island village paper table window light music water road").split()


def documents(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Document {i}.\n" + " ".join(rng.choice(WORDS) for _ in range(words)) + "\n" for i in range(n)]


def workload(docs: list[str], per_prefix: int, seed: int = 0) -> list[str]:
    """Questions in a random interleaving (a fixed round-robin order would send document d always
    to replica d mod 2, hiding what round-robin costs)."""
    out = [f"{d}Question {q}: what is word number {q + 3} of the document?\nAnswer:"
           for q in range(per_prefix) for d in docs]
    random.Random(seed).shuffle(out)
    return out


async def one(c: httpx.AsyncClient, prompt: str) -> float:
    t0 = time.perf_counter()
    body = {"text": prompt, "stream": True, "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
    ttft = None
    async with c.stream("POST", "/generate", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {") and json.loads(line[6:]).get("output_ids"):
                ttft = time.perf_counter() - t0
    return ttft if ttft is not None else time.perf_counter() - t0


async def drive(url: str, prompts: list[str], concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def gated(c, p):
        async with sem:
            return await one(c, p)

    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=concurrency + 8)) as c:
        t0 = time.perf_counter()
        ttfts = await asyncio.gather(*(gated(c, p) for p in prompts))
        wall = time.perf_counter() - t0
        metrics = (await c.get("/metrics")).text
    cached = sum(float(v) for v in re.findall(r"^sglang:cached_tokens_total\{[^}]*\} (\S+)", metrics, re.M))
    prompt = sum(float(v) for v in re.findall(r"^sglang:prompt_tokens_total\{[^}]*\} (\S+)", metrics, re.M))
    return {"rps": len(prompts) / wall, "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
            "cached_share": cached / prompt if prompt else float("nan"), "wall_s": wall}


def doubled_pool(flags: list[str]) -> list[str]:
    """The single server's flags on the mixed load: the KV pool of both replicas together."""
    out = list(flags)
    if "--max-total-tokens" in out:
        i = out.index("--max-total-tokens") + 1
        out[i] = str(2 * int(out[i]))
    return out


def run_arm(name: str, flags: list[str], prompts: list[str], concurrency: int, warm: str) -> dict:
    log = f"/tmp/bench_cluster_{name}.log"
    proc, url = start_server(flags, log)
    try:
        wait_healthy(url, proc, log, timeout=900)
        if "--replicas" in flags:  # /health is 200 with one replica up: wait for all
            n = int(flags[flags.index("--replicas") + 1])
            while sum(v == "ok" for v in httpx.get(url + "/health", timeout=10).json()["replicas"].values()) < n:
                time.sleep(1)
        # one tiny request per replica and no shared text, so start-up costs stay out of the figures
        for i in range(4):
            httpx.post(url + "/generate", timeout=300, json={"text": f"{warm} {i}", "sampling_params": {"max_new_tokens": 2}})
        httpx.post(url + "/flush_cache", timeout=60)
        return asyncio.run(drive(url, prompts, concurrency))
    finally:
        stop_server(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefixes", type=int, default=8)
    ap.add_argument("--per-prefix", type=int, default=12)
    ap.add_argument("--doc-words", type=int, default=795, help="~1 token each: ~800-token documents")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--server-args", default="--warmup-decode-bs 16 --max-total-tokens 4000",
                    help="more flags for every server")
    ap.add_argument("--arms", default="all", help="comma-separated arm names (prefix,round-robin,...), or all")
    args = ap.parse_args()
    cpu = cpu_info()
    print(f"cpu: {cpu['model']} | {' '.join(cpu['flags'])} | {os.cpu_count()} cores", flush=True)
    print(f"server args: {args.server_args!r}", flush=True)
    extra = args.server_args.split()
    mixed = workload(documents(args.prefixes, args.doc_words), args.per_prefix)
    single = workload(documents(1, args.doc_words, seed=1), args.prefixes * args.per_prefix)
    arms = {
        "prefix": (["--replicas", "2", "--router", "prefix", *extra], mixed),
        "round-robin": (["--replicas", "2", "--router", "round-robin", *extra], mixed),
        "single": (doubled_pool(extra), mixed),
        "prefix one-doc": (["--replicas", "2", "--router", "prefix", *extra], single),
        "single one-doc": (extra, single),
    }
    if args.arms != "all":
        arms = {n: arms[n] for n in args.arms.split(",")}
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for rnd in range(args.rounds):
        for name, (flags, prompts) in arms.items():
            r = run_arm(name.replace(" ", "_"), flags, prompts, args.concurrency, f"warm {rnd}")
            results[name].append(r)
            print(f"round {rnd + 1} {name:>22}: {r['rps']:.2f} req/s, TTFT p50 {r['ttft_p50'] * 1000:.0f} ms, "
                  f"p99 {r['ttft_p99'] * 1000:.0f} ms, cached share {r['cached_share']:.2f}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    print(f"\nmedians over {args.rounds} rounds; {args.prefixes} documents x {args.per_prefix} questions, "
          f"concurrency {args.concurrency} (cpu: {cpu['model']}, {os.cpu_count()} cores):")
    for n, m in med.items():
        print(f"  {n:>22}: {m['rps']:.2f} req/s, TTFT p50 {m['ttft_p50'] * 1000:.0f} ms, p99 {m['ttft_p99'] * 1000:.0f} ms, "
              f"cached share {m['cached_share']:.2f}")
    if "prefix" in med and "round-robin" in med:
        print(f"  prefix / round-robin throughput: {med['prefix']['rps'] / med['round-robin']['rps']:.2f}x "
              f"(target >= 1.5); cached share {med['prefix']['cached_share']:.2f} vs {med['round-robin']['cached_share']:.2f} "
              f"(target >= 0.85)")
    if "prefix one-doc" in med and "single one-doc" in med:
        print(f"  Ray path / single server, one document: "
              f"{med['prefix one-doc']['rps'] / med['single one-doc']['rps']:.2f}x (target >= 0.85)")
    if "prefix" in med and "single" in med:
        print(f"  mixed: 2 replicas (prefix) / single server {med['prefix']['rps'] / med['single']['rps']:.2f}x")


if __name__ == "__main__":
    main()
