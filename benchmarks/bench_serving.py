#!/usr/bin/env python
"""Online serving: the HTTP server under fixed concurrency and Poisson arrivals, against the offline
Engine on the same workload.

Workload: --num-requests requests, prompts of random token ids (seeded; lengths uniform in
[--input-min, --input-max]), outputs of uniform [--output-min, --output-max] tokens (ignore_eos, so
every system does the same work). Requests stream from /generate; a client records when each chunk
arrives: TTFT = first output chunk, ITL = gap between chunks / tokens in the later chunk, E2E = last.

  (1) concurrency --concurrency (default 32): request/s, output tok/s, TTFT / ITL / E2E p50 and p99;
      the offline Engine with max_running_requests = --concurrency runs the same requests in one
      generate call, so the ratio server / offline isolates the serving overhead (target >= 0.85).
  (2) Poisson arrivals at each --rates (req/s): the same figures.
  (3) cached prefix: a 1000-token prompt is prefilled once; then, one at a time, that prompt plus
      a 16-token suffix; TTFT p50 against the time of a bare decode step (ITL p50 of a lone
      stream) (target < 2x).

The server and the offline engine run one after the other, never together (2 cores). Medians of
--repeats runs for each figure.

    python benchmarks/bench_serving.py                       # full run
    python benchmarks/bench_serving.py --num-requests 16 --repeats 1 --rates 2   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx

from arborlm.runtime.model.execution import cpu_summary


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def workload(args, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(1000, 40000) for _ in range(rng.randint(args.input_min, args.input_max))],
             rng.randint(args.output_min, args.output_max)) for _ in range(args.num_requests)]


# ---- the server side ------------------------------------------------------------------------------
class Server:
    def __init__(self, args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-P", "-m", "arborlm.runtime.launch_server", "--port", str(port), "--dtype", args.dtype,
               "--log-level", "warning", "--max-running-requests", str(max(args.concurrency, 64))]
        self.proc = subprocess.Popen(cmd)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("server did not become healthy")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def one_request(client, ids, n_out, rec: dict):
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": n_out, "ignore_eos": True, "temperature": 0}}
    t0 = time.perf_counter()
    last, n_seen, itl = None, 0, []
    async with client.stream("POST", "/generate", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            n = len(json.loads(line[6:])["output_ids"])
            if n > n_seen:
                if last is None:
                    rec.setdefault("ttft", []).append(now - t0)
                else:
                    itl += [(now - last) / (n - n_seen)] * (n - n_seen)
                last, n_seen = now, n
    rec.setdefault("itl", []).extend(itl)
    rec.setdefault("e2e", []).append(time.perf_counter() - t0)
    rec["tokens"] = rec.get("tokens", 0) + n_seen


async def drive(url: str, reqs, concurrency: int | None = None, rate: float | None = None, seed: int = 0) -> dict:
    rec: dict = {}
    limits = httpx.Limits(max_connections=max(concurrency or 0, 256))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        if concurrency:
            sem = asyncio.Semaphore(concurrency)

            async def gated(ids, n):
                async with sem:
                    await one_request(client, ids, n, rec)

            await asyncio.gather(*(gated(ids, n) for ids, n in reqs))
        else:
            rng = random.Random(seed)
            tasks = []
            for ids, n in reqs:
                tasks.append(asyncio.ensure_future(one_request(client, ids, n, rec)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return summarize(rec, len(reqs), wall)


def summarize(rec: dict, n_reqs: int, wall: float) -> dict:
    out = {"wall_s": wall, "req_per_s": n_reqs / wall, "out_tok_per_s": rec.get("tokens", 0) / wall}
    for k in ("ttft", "itl", "e2e"):
        out[f"{k}_p50_ms"] = 1000 * pct(rec.get(k, []), 50)
        out[f"{k}_p99_ms"] = 1000 * pct(rec.get(k, []), 99)
    return out


async def cached_prefix(url: str, repeats: int) -> dict:
    rng = random.Random(7)
    prefix = [rng.randrange(1000, 40000) for _ in range(1000)]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await client.post("/generate", json={"input_ids": prefix, "sampling_params": {"max_new_tokens": 0}})
        ttft: dict = {}
        for i in range(max(repeats, 5)):
            suffix = [rng.randrange(1000, 40000) for _ in range(16)]
            await one_request(client, prefix + suffix, 2, ttft)
        lone: dict = {}
        await one_request(client, [rng.randrange(1000, 40000) for _ in range(16)], 48, lone)
    return {"cached_ttft_p50_ms": 1000 * pct(ttft["ttft"], 50), "decode_step_p50_ms": 1000 * pct(lone["itl"], 50)}


# ---- the offline side -----------------------------------------------------------------------------
def offline(args, reqs) -> dict:
    """The offline Engine in a subprocess (this script with --offline-child), so it never shares cores
    with the server."""
    cmd = [sys.executable, __file__, "--offline-child", "--dtype", args.dtype, "--concurrency", str(args.concurrency),
           "--num-requests", str(args.num_requests), "--input-min", str(args.input_min), "--input-max",
           str(args.input_max), "--output-min", str(args.output_min), "--output-max", str(args.output_max),
           "--seed", str(args.seed)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def offline_child(args) -> None:
    from arborlm.runtime import Engine

    reqs = workload(args, args.seed)
    with Engine(dtype=args.dtype, max_running_requests=args.concurrency) as eng:
        eng.generate(input_ids=[[5, 6, 7]], sampling_params={"max_new_tokens": 4})  # warm-up
        sps = [{"max_new_tokens": n, "ignore_eos": True, "temperature": 0} for _, n in reqs]
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=[ids for ids, _ in reqs], sampling_params=sps)
        wall = time.perf_counter() - t0
    toks = sum(len(o["output_ids"]) for o in outs)
    print(json.dumps({"wall_s": wall, "req_per_s": len(reqs) / wall, "out_tok_per_s": toks / wall}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-min", type=int, default=64)
    ap.add_argument("--input-max", type=int, default=256)
    ap.add_argument("--output-min", type=int, default=32)
    ap.add_argument("--output-max", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rates", default="1,4", help="Poisson request rates (req/s), comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="offline,concurrency,poisson,cached",
                    help="which of (1) concurrency (with its offline baseline), (2) poisson, (3) cached to run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--offline-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_child:
        return offline_child(args)

    rates = [float(r) for r in args.rates.split(",") if r]
    parts = set(args.parts.split(","))
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        reqs = workload(args, args.seed)
        if "concurrency" in parts or "offline" in parts:
            log(f"run {rep + 1}/{args.repeats}: offline engine")
            runs.setdefault("offline", []).append(offline(args, reqs))
        log(f"run {rep + 1}/{args.repeats}: server")
        srv = Server(args)
        try:
            asyncio.run(drive(srv.url, reqs[:4], concurrency=4))  # warm-up
            if "concurrency" in parts:
                runs.setdefault(f"server c={args.concurrency}", []).append(
                    asyncio.run(drive(srv.url, reqs, concurrency=args.concurrency)))
            for r in rates if "poisson" in parts else ():
                runs.setdefault(f"server poisson {r:g}/s", []).append(asyncio.run(drive(srv.url, reqs, rate=r, seed=rep)))
            if "cached" in parts:
                runs.setdefault("cached prefix", []).append(asyncio.run(cached_prefix(srv.url, args.repeats)))
        finally:
            srv.stop()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    conc = med.get(f"server c={args.concurrency}")
    ratio = conc["out_tok_per_s"] / med["offline"]["out_tok_per_s"] if conc else None
    cp = med.get("cached prefix")
    ttft_ratio = cp["cached_ttft_p50_ms"] / cp["decode_step_p50_ms"] if cp else None
    if args.json:
        print(json.dumps({"cpu": cpu_summary(), "medians": med, "server_vs_offline": ratio,
                          "cached_ttft_vs_decode_step": ttft_ratio}))
        return
    print(f"\nbench_serving: {args.num_requests} requests, input {args.input_min}-{args.input_max}, "
          f"output {args.output_min}-{args.output_max} tokens, dtype {args.dtype}, medians of {args.repeats} runs")
    print(f"cpu: {cpu_summary()}\n")
    cols = ["req_per_s", "out_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms"]
    print(f"{'system':26s}" + "".join(f"{c:>14s}" for c in cols))
    for name, m in med.items():
        if name == "cached prefix":
            continue
        print(f"{name:26s}" + "".join(f"{m.get(c, float('nan')):14.2f}" for c in cols))
    if ratio is not None:
        print(f"\nserver / offline output tok/s at concurrency {args.concurrency}: {ratio:.2f}x (target >= 0.85)")
    if cp:
        print(f"cached 1000-token prefix: TTFT p50 {cp['cached_ttft_p50_ms']:.1f} ms vs a bare decode step "
              f"{cp['decode_step_p50_ms']:.1f} ms = {ttft_ratio:.2f}x (target < 2)")


if __name__ == "__main__":
    main()
