#!/usr/bin/env python
"""The first minute: W1 decode speed of a fresh process in 10 s windows, with an empty and with a
warm compile cache, beside the steady state, eager decode and the server, all in one run.

W1 = one ~64-token prompt -> 128 new tokens (greedy, ignore_eos), requests back to back; a window's
tok/s is the tokens of the requests that ended in it over their wall time (prefill included).

Arms, each in a fresh process (the script re-invokes itself), in this order:
  empty    an Engine over an empty Inductor cache and no saved decode graphs (a new machine)
  compiled Engine(warmup_decode_bs=1) on the same cache: bucket 1 compiled (and saved) before it serves
  warm     a fresh Engine once more: the graphs the arms before it compiled are on disk now
  eager    Engine(compile_decode=False)
  server   `arborlm serve` (default settings) with W1 sent over HTTP, client-timed
The steady state is the median of the compiled arm's last 3 requests.
Targets (issue 26): warm >= 0.9x steady from the first window; empty: no window below 0.5x steady;
eager >= 0.5x compiled; Engine >= 0.97x server.

    python benchmarks/bench_warmup.py                  # ~9 min on 2 cores
    python benchmarks/bench_warmup.py --seconds 60 --arms warm,server
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = ("The history of the city begins in the early middle ages, when a small settlement grew up around "
          "a river crossing and a market. Merchants came from the coast, and the town grew rich on the trade in ")
NEW = 128


def cpu() -> str:
    from arborlm.runtime.model.execution import cpu_summary

    name = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{name} ({os.cpu_count()} cores; {cpu_summary()})"


def sampling(i: int) -> dict:
    return {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}


def windows(events: list[tuple[float, float]], width: float, seconds: float) -> list[float | None]:
    """events: (end time since ready, duration) of each request -> tok/s per window."""
    out = []
    for w in range(int(seconds // width)):
        inside = [d for end, d in events if w * width <= end < (w + 1) * width]
        out.append(NEW * len(inside) / sum(inside) if inside else None)
    return out


# ---- children -------------------------------------------------------------------------------------
def child_engine(arm: str, seconds: float, cache: str) -> dict:
    t0 = time.perf_counter()
    if arm != "eager":  # isolate the compile caches: `cache` is empty on the first arm
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
        from pathlib import Path

        from arborlm.runtime.model import decode_graph

        decode_graph.graphs_root = lambda: Path(cache) / "decode_graphs"
    from arborlm.runtime import Engine

    kw = {"eager": {"compile_decode": False}, "compiled": {"warmup_decode_bs": 1}}.get(arm, {})
    engine = Engine(**kw)
    ready = time.perf_counter()
    events, i = [], 0
    while time.perf_counter() - ready < seconds:
        t = time.perf_counter()
        engine.generate(PROMPT + str(i), sampling(i))
        events.append((time.perf_counter() - ready, time.perf_counter() - t))
        i += 1
    graphs = engine.runner.decode_graphs
    state = graphs.state() if graphs is not None else None
    engine.shutdown()
    return {"startup_s": ready - t0, "events": events, "graphs": state,
            "plan": engine.runner.plan.describe()}


def child_server(seconds: float) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "arborlm")
    t0 = time.perf_counter()
    proc = subprocess.Popen([exe, "serve", "--port", str(port), "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
            if proc.poll() is not None:
                raise RuntimeError("the server exited")
        ready = time.perf_counter()
        events, i = [], 0
        while time.perf_counter() - ready < seconds:
            t = time.perf_counter()
            r = httpx.post(url + "/generate", json={"text": PROMPT + str(i), "sampling_params": sampling(i)},
                           timeout=300)
            assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == NEW, r.text
            events.append((time.perf_counter() - ready, time.perf_counter() - t))
            i += 1
        graphs = httpx.get(url + "/get_server_info", timeout=10).json()["scheduler"].get("decode_graphs")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {"startup_s": ready - t0, "events": events, "graphs": graphs}


# ---- parent ---------------------------------------------------------------------------------------
def run_arm(arm: str, seconds: float, cache: str) -> dict:
    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--_child", arm, "--seconds", str(seconds),
           "--_cache", cache]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 900)
    if out.returncode != 0:
        raise RuntimeError(f"arm {arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90, help="each arm's run after it is ready")
    ap.add_argument("--arms", default="empty,compiled,warm,eager,server")
    ap.add_argument("--window", type=float, default=10)
    ap.add_argument("--_child")
    ap.add_argument("--_cache")
    a = ap.parse_args()
    if a._child:
        res = child_server(a.seconds) if a._child == "server" else child_engine(a._child, a.seconds, a._cache)
        print(json.dumps(res))
        return
    cache = tempfile.mkdtemp(prefix="arborlm-warmup-")
    print(f"CPU: {cpu()}; W1 = ~64-token prompt -> {NEW} tokens, back to back, {a.seconds:g} s per arm")
    results = {}
    try:
        for arm in a.arms.split(","):
            results[arm] = run_arm(arm, a.seconds, cache)
            r = results[arm]
            print(f"  {arm}: ready in {r['startup_s']:.1f} s, {len(r['events'])} requests, graphs {r['graphs']}",
                  flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    def last3(arm):
        return statistics.median(NEW / d for _, d in results[arm]["events"][-3:])

    steady = last3("compiled") if "compiled" in results else None
    print(f"\n{'arm':<8} {'ready s':>8}  tok/s per {a.window:g} s window (x steady)")
    for arm, r in results.items():
        ws = windows(r["events"], a.window, a.seconds)
        cells = " ".join("   -  " if w is None else f"{w:5.1f}" + (f"({w / steady:.2f})" if steady else "")
                         for w in ws)
        print(f"{arm:<8} {r['startup_s']:8.1f}  {cells}")
    if steady:
        print(f"\nsteady state (compiled arm, median of its last 3 requests): {steady:.1f} tok/s")
        for arm in ("empty", "warm"):
            if arm in results:
                ws = [w for w in windows(results[arm]["events"], a.window, a.seconds) if w is not None]
                print(f"  {arm}: first window {ws[0] / steady:.2f}x steady, lowest window {min(ws) / steady:.2f}x")
        if "eager" in results:
            print(f"  eager / compiled: {last3('eager') / steady:.2f}x")
        if "server" in results:
            print(f"  Engine / server (client-timed, medians of the last 3): {steady / last3('server'):.2f}x "
                  f"({steady:.1f} vs {last3('server'):.1f} tok/s)")


if __name__ == "__main__":
    main()
