#!/usr/bin/env python
"""Interactive time-to-first-token under a saturating batch load, with and without priorities.

One server (the embedded model, --schedule-policy priority, --max-running-requests R) is kept
busy by --batch-workers clients that each loop on a ~200-token prompt with 128 new tokens, so
requests always wait. Meanwhile an interactive client sends a short streamed request every
--interval seconds and times its first token. Windows alternate between the two arms, --rounds
windows each, in the same run:

  without: interactive requests carry no priority (the same as the batch load: arrival order);
  with:    interactive requests carry priority 10 (admitted first, and a running batch request is
           retracted for one when no row is free).

Prints, per arm, the median over windows of the TTFT p50 and p99 and of the batch throughput, and
the ratios without / with. The CPU is printed first: figures from different CPUs do not compare.

    python benchmarks/bench_priority.py                      # 3 rounds of 2 x 30 s windows
    python benchmarks/bench_priority.py --window 20 --rounds 3 --batch-workers 24
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak import cpu_info, pct, start_server, stop_server, wait_healthy  # noqa: E402

BATCH_PROMPT = " ".join(["The history of the river town, its markets, bridges and harbour, told in detail."] * 12)


async def batch_worker(c: httpx.AsyncClient, stop: asyncio.Event, tokens: list) -> None:
    while not stop.is_set():
        r = await c.post("/generate", json={"text": BATCH_PROMPT, "priority": 0,
                                            "sampling_params": {"max_new_tokens": 128, "ignore_eos": True}})
        if r.status_code == 200:
            tokens.append((time.perf_counter(), r.json()["meta_info"]["completion_tokens"]))


async def interactive(c: httpx.AsyncClient, priority: int | None) -> float | None:
    body = {"text": "Q: What is the capital of France?\nA:", "stream": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    if priority is not None:
        body["priority"] = priority
    t0 = time.perf_counter()
    async with c.stream("POST", "/generate", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("output_ids"):
                return time.perf_counter() - t0
    return None


async def window(c: httpx.AsyncClient, priority: int | None, seconds: float, interval: float, tokens: list) -> dict:
    start, tasks = time.perf_counter(), []
    while time.perf_counter() - start < seconds:
        tasks.append(asyncio.ensure_future(interactive(c, priority)))
        await asyncio.sleep(interval)
    ttfts = [t for t in await asyncio.gather(*tasks) if t is not None]
    end = time.perf_counter()
    done = sum(n for t, n in tokens if start <= t <= end)
    return {"p50": pct(ttfts, 50), "p99": pct(ttfts, 99), "n": len(ttfts), "batch_tok_s": done / (end - start)}


async def run(url: str, args) -> dict:
    stop, tokens = asyncio.Event(), []
    limits = httpx.Limits(max_connections=args.batch_workers + 64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        workers = [asyncio.ensure_future(batch_worker(c, stop, tokens)) for _ in range(args.batch_workers)]
        await asyncio.sleep(args.warmup)
        arms = {"without": [], "with": []}
        for rnd in range(args.rounds):
            for arm, priority in (("without", None), ("with", 10)):
                w = await window(c, priority, args.window, args.interval, tokens)
                arms[arm].append(w)
                print(f"round {rnd + 1} {arm:>7} priorities: TTFT p50 {w['p50'] * 1000:7.0f} ms  p99 "
                      f"{w['p99'] * 1000:7.0f} ms  (n={w['n']})  batch {w['batch_tok_s']:.1f} tok/s", flush=True)
        stop.set()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=30.0, help="seconds per window")
    ap.add_argument("--rounds", type=int, default=3, help="windows per arm (medians over them)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between interactive requests")
    ap.add_argument("--batch-workers", type=int, default=24)
    ap.add_argument("--max-running-requests", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of batch load before measuring")
    ap.add_argument("--server-args", default="", help="more flags for the server")
    args = ap.parse_args()
    cpu = cpu_info()
    print(f"cpu: {cpu['model']} | {' '.join(cpu['flags'])}")
    flags = ["--schedule-policy", "priority", "--max-running-requests", str(args.max_running_requests),
             "--max-queued-requests", "0", *args.server_args.split()]
    proc, url = start_server(flags, "/tmp/bench_priority_server.log")
    try:
        wait_healthy(url, proc, "/tmp/bench_priority_server.log")
        print(f"server: {' '.join(flags)}; {args.batch_workers} batch clients (200-token prompts, 128 new tokens); "
              f"an interactive stream (8 tokens) every {args.interval:g} s", flush=True)
        arms = asyncio.run(run(url, args))
    finally:
        stop_server(proc)
    med = {arm: {k: statistics.median(w[k] for w in ws) for k in ("p50", "p99", "batch_tok_s")} for arm, ws in arms.items()}
    print(f"\nmedians over {args.rounds} windows of {args.window:g} s (cpu: {cpu['model']}):")
    for arm in ("without", "with"):
        m = med[arm]
        print(f"  {arm:>7} priorities: TTFT p50 {m['p50'] * 1000:7.0f} ms  p99 {m['p99'] * 1000:7.0f} ms  "
              f"batch {m['batch_tok_s']:.1f} tok/s")
    print(f"  ratio without/with: TTFT p50 {med['without']['p50'] / med['with']['p50']:.1f}x, "
          f"p99 {med['without']['p99'] / med['with']['p99']:.1f}x; batch throughput "
          f"{med['with']['batch_tok_s'] / med['without']['batch_tok_s']:.2f}x of the no-priority arm")


if __name__ == "__main__":
    main()
