#!/usr/bin/env python
"""Reliability soak: the HTTP server under mixed, hostile traffic for --minutes, then a check that
it gave everything back.

--concurrency client workers loop until the time is up, each picking at random: a short native
/generate, a ~1500-token prompt with a short answer, an OpenAI chat completion, a chat stream the
client cuts after 1-5 chunks, a native stream read to the end, an explicit /abort_request of a long
generation, json_schema and regex constrained requests, and a request with sampling_params.timeout
0.5 s (it must finish with finish_reason "abort"). Every ~20 s a burst of 40 requests at once
overflows --max-queued-requests (the answer must be 429 with a Retry-After header).

Every outcome is classified: ok, cut (the client closed a stream on purpose), aborted, rejected_429,
other_4xx, 5xx, client_error (connection errors, timeouts, malformed answers). Every minute the
RSS of the server and all its descendants is sampled. At the end the script waits until no request
runs, flushes the cache and reads the scheduler's counters.

Targets: 5xx = 0; leaked KV slots (pool_size - free_slots after the flush) = 0; RSS growth from
the end of the warm-up (--warmup-minutes, default 5: decode graphs compile for each new batch size
meanwhile) to the end < 5%. Exit code 1 if there were 5xx answers or leaked slots.

    python benchmarks/soak.py                                   # 30 minutes on its own server
    python benchmarks/soak.py --minutes 1.5 --concurrency 6     # smoke run
    python benchmarks/soak.py --url http://127.0.0.1:30000 --pid 1234   # an already running server
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import pct  # noqa: E402

DEFAULT_SERVER_ARGS = "--max-queued-requests 16 --request-timeout 60"
OUTCOMES = ("ok", "cut", "aborted", "rejected_429", "other_4xx", "5xx", "client_error")
SHOW_FIRST = 3  # bodies printed per kind of failure
BURST_SIZE, BURST_EVERY_S = 40, 20.0
MAX_MINUTES = 240
CLIENT_TIMEOUT_S = 180  # beyond the server's own --request-timeout, so the server's answer arrives first

WORDS = ("the a of and to in is was for on with as by at from that this it be are river mountain city garden "
         "window morning evening story music water light stone forest bridge market letter paper table chair "
         "road train station harbor island village teacher student doctor farmer painter winter summer spring "
         "autumn quiet bright slow green blue red old new small large warm cold").split()  # ~1 token each
QUESTIONS = ("Name a color.", "What is 2 plus 3?", "Say hello in French.", "Give me a fruit.",
             "Write one word about the sea.", "What day comes after Monday?", "Count to five.")
PERSON_SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False,
})
CODE_REGEX = r"[A-Z]{3}-[0-9]{4}"


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- what one run records -------------------------------------------------------------------------
@dataclass
class Record:
    model: str = "default"
    counts: collections.Counter = field(default_factory=collections.Counter)  # (kind, outcome) -> n
    examples: dict = field(default_factory=dict)  # outcome -> first few details
    failures: list = field(default_factory=list)  # broken expectations (a timeout not honoured, ...)
    latencies: dict = field(default_factory=dict)  # kind -> seconds of its ok non-stream requests
    ttfts: list = field(default_factory=list)  # seconds, streams
    bursts: int = 0

    def add(self, kind: str, outcome: str, detail: str | None) -> None:
        self.counts[kind, outcome] += 1
        if outcome in ("other_4xx", "5xx", "client_error") and detail:
            shown = self.examples.setdefault(outcome, [])
            if len(shown) < SHOW_FIRST:
                shown.append(f"[{kind}] {detail}")
                log(f"{outcome}: [{kind}] {detail}")

    def fail(self, kind: str, message: str) -> None:
        self.failures.append(f"[{kind}] {message}")
        if len(self.failures) <= SHOW_FIRST:
            log(f"expectation failed: [{kind}] {message}")

    def total(self, outcome: str | None = None) -> int:
        return sum(n for (_, o), n in self.counts.items() if outcome in (None, o))


# ---- answers -------------------------------------------------------------------------------------
def status_outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 429:
        return "rejected_429"
    return "other_4xx" if status < 500 else "5xx"


def refused(r: httpx.Response, path: str, kind: str, rec: Record) -> tuple[str, str]:
    """The outcome of a non-2xx answer; a 429 must say when to come back."""
    if r.status_code == 429 and "retry-after" not in r.headers:
        rec.fail(kind, f"429 from {path} without a Retry-After header")
    return status_outcome(r.status_code), f"{r.status_code} {path}: {r.text[:300]}"


def finish_type(event: dict) -> str | None:
    """finish_reason's type in a native answer, or finish_reason in an OpenAI one."""
    if "meta_info" in event:
        return (event["meta_info"].get("finish_reason") or {}).get("type")
    choices = event.get("choices") or [{}]
    return choices[0].get("finish_reason")


def has_output(event: dict) -> bool:
    if "meta_info" in event:
        return bool(event.get("output_ids"))
    choices = event.get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


async def post(client, path: str, body: dict, kind: str, rec: Record) -> tuple[str, str | None, dict | None]:
    """A non-stream request: (outcome, detail, answer); 'aborted' when it finished by an abort."""
    t0 = time.perf_counter()
    r = await client.post(path, json=body)
    if r.status_code >= 300:
        return (*refused(r, path, kind, rec), None)
    data = r.json()
    if finish_type(data) == "abort":
        return "aborted", None, data
    rec.latencies.setdefault(kind, []).append(time.perf_counter() - t0)
    return "ok", None, data


async def stream(client, path: str, body: dict, kind: str, rec: Record, cut_after: int = 0) -> tuple[str, str | None]:
    """A streamed request read to the end, or closed after cut_after events; records its TTFT."""
    t0, events, last, got_output = time.perf_counter(), 0, None, False
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code >= 300:
            await r.aread()
            return refused(r, path, kind, rec)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:  # an error after the 200 arrives as the stream's last event
                code = event["error"].get("code")
                return status_outcome(code if isinstance(code, int) else 500), f"{path} stream: {line[:300]}"
            if not got_output and has_output(event):
                got_output = True
                rec.ttfts.append(time.perf_counter() - t0)
            events, last = events + 1, event
            if cut_after and events >= cut_after:
                return "cut", None  # leaving the block closes the connection: the server must abort
    return ("aborted" if last is not None and finish_type(last) == "abort" else "ok"), None


# ---- the kinds of request ------------------------------------------------------------------------
def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat_body(rec: Record, rng: random.Random, max_tokens: int) -> dict:
    return {"model": rec.model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}


async def short(client, rng, rec):
    body = {"text": words(rng, rng.randint(4, 24)), "sampling_params": {"max_new_tokens": rng.randint(8, 32)}}
    return (await post(client, "/generate", body, "short", rec))[:2]


async def burst(client, rng, rec):
    body = {"text": words(rng, 8), "sampling_params": {"max_new_tokens": 8}}
    return (await post(client, "/generate", body, "burst", rec))[:2]


async def long_prompt(client, rng, rec):
    body = {"text": words(rng, 1500), "sampling_params": {"max_new_tokens": rng.randint(1, 8)}}
    return (await post(client, "/generate", body, "long_prompt", rec))[:2]


async def chat(client, rng, rec):
    return (await post(client, "/v1/chat/completions", chat_body(rec, rng, rng.randint(8, 32)), "chat", rec))[:2]


async def chat_stream_cut(client, rng, rec):
    return await stream(client, "/v1/chat/completions", chat_body(rec, rng, 64), "chat_stream_cut", rec,
                        cut_after=rng.randint(1, 5))


async def native_stream(client, rng, rec):
    body = {"text": words(rng, rng.randint(4, 24)), "sampling_params": {"max_new_tokens": rng.randint(16, 48)}}
    return await stream(client, "/generate", body, "native_stream", rec)


async def explicit_abort(client, rng, rec):
    """A long generation aborted by rid 0.2-1 s after it was sent."""
    rid = f"soak-{uuid.uuid4().hex}"
    body = {"text": words(rng, 16), "rid": rid, "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    task = asyncio.ensure_future(post(client, "/generate", body, "abort", rec))
    await asyncio.sleep(rng.uniform(0.2, 1.0))
    try:
        r = await client.post("/abort_request", json={"rid": rid})
        if r.status_code != 200:
            rec.fail("abort", f"/abort_request answered {r.status_code}: {r.text[:200]}")
    except httpx.HTTPError as e:
        rec.fail("abort", f"/abort_request failed: {type(e).__name__}: {e}")
    outcome, detail, data = await task
    if outcome == "ok":
        rec.fail("abort", f"finished with {finish_type(data)!r} despite the abort")
    return outcome, detail


async def json_schema(client, rng, rec):
    body = {"text": f"A person, as JSON. {words(rng, 6)}",
            "sampling_params": {"max_new_tokens": 64, "json_schema": PERSON_SCHEMA}}
    outcome, detail, data = await post(client, "/generate", body, "json_schema", rec)
    if outcome == "ok" and finish_type(data) == "stop":
        try:
            doc = json.loads(data["text"])
        except ValueError as e:
            doc = f"not JSON ({e})"
        if not isinstance(doc, dict) or set(doc) != {"name", "age"}:
            rec.fail("json_schema", f"not the schema's object: {data['text'][:200]!r}")
    return outcome, detail


async def regex(client, rng, rec):
    body = {"text": f"A product code: {words(rng, 4)}", "sampling_params": {"max_new_tokens": 16, "regex": CODE_REGEX}}
    outcome, detail, data = await post(client, "/generate", body, "regex", rec)
    if outcome == "ok" and finish_type(data) == "stop" and not re.fullmatch(CODE_REGEX, data["text"]):
        rec.fail("regex", f"{data['text'][:200]!r} does not match {CODE_REGEX}")
    return outcome, detail


async def timeout(client, rng, rec):
    """sampling_params.timeout 0.5 s on a 2000-token generation: it must end by an abort."""
    body = {"text": words(rng, 8), "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True, "timeout": 0.5}}
    outcome, detail, data = await post(client, "/generate", body, "timeout", rec)
    if outcome == "ok":
        rec.fail("timeout", f"finished with {finish_type(data)!r}, not by the 0.5 s timeout")
    return outcome, detail


KINDS = {  # name -> (function, weight)
    "short": (short, 25), "long_prompt": (long_prompt, 10), "chat": (chat, 12),
    "chat_stream_cut": (chat_stream_cut, 10), "native_stream": (native_stream, 10), "abort": (explicit_abort, 6),
    "json_schema": (json_schema, 8), "regex": (regex, 8), "timeout": (timeout, 6),
}


async def run_one(client, kind: str, rng: random.Random, rec: Record) -> str:
    fn = burst if kind == "burst" else KINDS[kind][0]
    try:
        outcome, detail = await fn(client, rng, rec)
    except httpx.HTTPError as e:
        outcome, detail = "client_error", f"{type(e).__name__}: {e}"
    except (ValueError, KeyError, TypeError) as e:  # a 2xx answer that is not what the API promises
        outcome, detail = "client_error", f"malformed answer: {type(e).__name__}: {e}"
    rec.add(kind, outcome, detail)
    return outcome


# ---- the traffic ---------------------------------------------------------------------------------
async def sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))


async def worker(client, kinds: list[str], rng: random.Random, rec: Record, stop_at: float) -> None:
    weights = [KINDS[k][1] for k in kinds]
    while time.monotonic() < stop_at:
        kind = rng.choices(kinds, weights)[0]
        if await run_one(client, kind, rng, rec) in ("rejected_429", "client_error"):
            await asyncio.sleep(rng.uniform(0.1, 0.5))  # back off, as a polite client would


async def bursts(client, rng: random.Random, rec: Record, stop_at: float) -> None:
    """BURST_SIZE short requests at once every ~BURST_EVERY_S, beyond any sane queue limit."""
    while True:
        await sleep_until(min(time.monotonic() + BURST_EVERY_S * rng.uniform(0.9, 1.1), stop_at))
        if time.monotonic() >= stop_at:
            return
        rec.bursts += 1
        await asyncio.gather(*(run_one(client, "burst", rng, rec) for _ in range(BURST_SIZE)))


async def minutes_report(rec: Record, pid: int | None, t0: float, stop_at: float, rss: list) -> None:
    minute = 1
    while True:
        await sleep_until(min(t0 + 60 * minute, stop_at))
        if time.monotonic() >= stop_at:
            return
        sample_rss(rec, pid, minute, rss)
        minute += 1


def sample_rss(rec: Record, pid: int | None, minute: float, rss: list) -> None:
    mib = tree_rss_mib(pid) if pid else None
    rss.append((minute, rec.total(), mib))
    mem = f"RSS {mib:.1f} MiB" if mib is not None else "RSS unknown (no --pid)"
    log(f"minute {minute:g}: {rec.total()} requests (ok {rec.total('ok')}, 429 {rec.total('rejected_429')}, "
        f"5xx {rec.total('5xx')}, client errors {rec.total('client_error')}), {mem}")


# ---- the server process ----------------------------------------------------------------------------
def tree_rss_mib(pid: int) -> float | None:
    """VmRSS of pid and all its descendants (from /proc, Linux); None once pid is gone."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    if pid not in parent:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    kb = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/status") as f:
                kb += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return kb / 1024


def start_server(extra: list[str], log_path: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-P", "-m", "arborlm.runtime.launch_server", "--port", str(port), "--log-level", "warning", *extra]
    log(f"starting: {shlex.join(cmd[1:])} (log: {log_path})")
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen | None, log_path: str | None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = open(log_path).read()[-2000:] if log_path else ""
            raise SystemExit(f"the server exited with {proc.returncode}:\n{tail}\n(if it does not know "
                             f"--max-queued-requests / --request-timeout yet: --server-args '' --skip timeout)")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not healthy within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log("the server ignored SIGTERM for 30 s; killing it")
            proc.kill()
            proc.wait()


# ---- the end -------------------------------------------------------------------------------------
async def final_check(client) -> dict:
    """Wait until idle (<= 60 s), flush the cache, read the scheduler's counters."""
    t0, drained = time.monotonic(), False
    while time.monotonic() - t0 < 60:
        s = (await client.get("/get_server_info")).json()["scheduler"]
        if s["running_requests"] == 0 and s["waiting_requests"] == 0:
            drained = True
            break
        await asyncio.sleep(0.5)
    drain_s = time.monotonic() - t0
    flushed = False
    for _ in range(5):
        r = await client.post("/flush_cache")
        if r.status_code == 200 and r.json().get("success"):
            flushed = True
            break
        await asyncio.sleep(1)
    s = (await client.get("/get_server_info")).json()["scheduler"]
    return {"drained": drained, "drain_s": round(drain_s, 2), "flushed": flushed,
            "leaked_kv_slots": s["pool_size"] - s["free_slots"], "scheduler": s}


def cpu_info() -> dict:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]}


def rss_growth_pct(rss: list, warmup: float) -> float | None:
    """From the first sample after the warm-up (or minute 0 if the run was shorter) to the last."""
    known = [(m, mib) for m, _, mib in rss if mib is not None]
    later = [mib for m, mib in known if m >= warmup]
    series = later if len(later) > 1 else [mib for _, mib in known]
    return 100 * (series[-1] - series[0]) / series[0] if len(series) > 1 else None


def latency_ms(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": 1000 * pct(xs, 50), "p99": 1000 * pct(xs, 99), "max": 1000 * max(xs, default=float("nan"))}


def summarize(args, rec: Record, duration: float, end: dict | None, rss: list) -> dict:
    kinds = sorted({k for k, _ in rec.counts})
    return {
        "cpu": cpu_info(), "minutes": args.minutes, "duration_s": round(duration, 1), "concurrency": args.concurrency,
        "seed": args.seed, "server": args.url or f"own: {args.server_args}", "skipped_kinds": args.skip,
        "requests": rec.total(), "outcomes": {o: rec.total(o) for o in OUTCOMES},
        "by_kind": {k: {o: rec.counts[k, o] for o in OUTCOMES if rec.counts[k, o]} for k in kinds},
        "bursts": rec.bursts, "examples": rec.examples, "expectation_failures": rec.failures,
        "server_errors_5xx": rec.total("5xx"), "end": end,
        "leaked_kv_slots": end["leaked_kv_slots"] if end else None,
        "rss_mib": [{"minute": m, "requests": n, "mib": None if mib is None else round(mib, 1)} for m, n, mib in rss],
        "rss_growth_pct": rss_growth_pct(rss, args.warmup_minutes), "warmup_minutes": args.warmup_minutes,
        "latency_ms": latency_ms([x for xs in rec.latencies.values() for x in xs]),
        "latency_ms_by_kind": {k: latency_ms(xs) for k, xs in sorted(rec.latencies.items())},
        "ttft_ms": latency_ms(rec.ttfts),
    }


def print_summary(s: dict) -> None:
    print(f"\nsoak: {s['duration_s']:.0f} s ({s['minutes']:g} min asked), concurrency {s['concurrency']}, seed {s['seed']}, "
          f"server {s['server']}" + (f", skipped: {','.join(s['skipped_kinds'])}" if s["skipped_kinds"] else ""))
    print(f"cpu: {s['cpu']['model']} | {' '.join(s['cpu']['flags']) or 'none of avx2/avx512'}")
    print(f"requests: {s['requests']} ({s['requests'] / max(s['duration_s'], 1e-9):.1f}/s), bursts of {BURST_SIZE}: {s['bursts']}")
    print("  " + " | ".join(f"{o} {n}" for o, n in s["outcomes"].items()))
    for kind, counts in s["by_kind"].items():
        lat = s["latency_ms_by_kind"].get(kind)
        took = f"  (ok latency p50 {lat['p50']:.0f} ms, max {lat['max']:.0f} ms)" if lat else ""
        print(f"  {kind:16s} " + ", ".join(f"{o} {n}" for o, n in counts.items()) + took)
    for outcome, shown in s["examples"].items():
        print(f"first {outcome}:")
        for line in shown:
            print(f"  {line}")
    fails = s["expectation_failures"]
    print(f"expectation failures: {len(fails)}" + "".join(f"\n  {f}" for f in fails[:SHOW_FIRST]))
    print(f"5xx: {s['server_errors_5xx']} (target 0)")
    end = s["end"]
    if end is None:
        print("leaked KV slots: unknown (the server did not answer /get_server_info)")
    else:
        sch = end["scheduler"]
        print(f"leaked KV slots: {end['leaked_kv_slots']} of {sch['pool_size']} (target 0); protected tokens "
              f"{sch['protected_tokens']}; free request rows {sch['free_request_rows']} / {sch['max_running_requests']}; "
              f"{'drained' if end['drained'] else 'NOT drained'} in {end['drain_s']} s; "
              f"cache {'flushed' if end['flushed'] else 'NOT flushed'}")
    samples = ", ".join(f"{r['minute']:g}: {r['mib']}" for r in s["rss_mib"])
    growth = s["rss_growth_pct"]
    print(f"RSS MiB by minute: {samples or 'none'}; growth from minute {s['warmup_minutes']:g} to the end: "
          + (f"{growth:+.1f}% (target < 5%)" if growth is not None else "unknown"))
    lat, ttft = s["latency_ms"], s["ttft_ms"]
    print(f"latency of ok non-stream requests (n={lat['n']}): p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, "
          f"max {lat['max']:.0f} ms")
    print(f"TTFT of streams (n={ttft['n']}): p50 {ttft['p50']:.0f} ms, p99 {ttft['p99']:.0f} ms")


# ---- main ----------------------------------------------------------------------------------------
async def soak(args, url: str, pid: int | None) -> dict:
    rec, rss = Record(), []
    limits = httpx.Limits(max_connections=args.concurrency + 2 * BURST_SIZE)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(CLIENT_TIMEOUT_S, connect=10), limits=limits) as client:
        rec.model = (await client.get("/v1/models")).json()["data"][0]["id"]
        r = await client.post("/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 4}})
        r.raise_for_status()  # the warm-up
        t0 = time.monotonic()
        stop_at = t0 + 60 * args.minutes
        sample_rss(rec, pid, 0, rss)
        kinds = [k for k in KINDS if k not in args.skip]
        rngs = [random.Random(args.seed * 1000 + i) for i in range(args.concurrency + 1)]
        await asyncio.gather(*(worker(client, kinds, rngs[i], rec, stop_at) for i in range(args.concurrency)),
                             bursts(client, rngs[-1], rec, stop_at), minutes_report(rec, pid, t0, stop_at, rss))
        duration = time.monotonic() - t0
        sample_rss(rec, pid, round(duration / 60, 2), rss)
        try:
            end = await final_check(client)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            log(f"the end-of-run check failed: {type(e).__name__}: {e}")
            end = None
    return summarize(args, rec, duration, end, rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=12, help="client workers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-minutes", type=float, default=5.0, help="RSS growth is measured from here")
    ap.add_argument("--url", help="an already running server (else one is started here)")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS (else RSS is skipped)")
    ap.add_argument("--server-args", default=DEFAULT_SERVER_ARGS, help="extra flags of the server started here")
    ap.add_argument("--skip", type=lambda s: [k for k in s.split(",") if k], default=[],
                    help=f"kinds of request to leave out, comma-separated, of: {','.join(KINDS)}")
    ap.add_argument("--json", metavar="PATH", help="also write the summary here")
    args = ap.parse_args()
    if not 0 < args.minutes <= MAX_MINUTES:
        ap.error(f"--minutes must be in (0, {MAX_MINUTES}]")
    if args.concurrency < 1:
        ap.error("--concurrency must be >= 1")
    if unknown := set(args.skip) - set(KINDS):
        ap.error(f"--skip: unknown kinds {sorted(unknown)}; known: {','.join(KINDS)}")
    if len(args.skip) == len(KINDS):
        ap.error("--skip: nothing left to send")

    proc = log_path = None
    url, pid = args.url, args.pid
    try:
        if url is None:
            fd, log_path = tempfile.mkstemp(prefix="arborlm-soak-", suffix=".log")
            os.close(fd)
            proc, url = start_server(shlex.split(args.server_args), log_path)
            pid = proc.pid
        wait_healthy(url, proc, log_path)
        summary = asyncio.run(soak(args, url, pid))
        if proc is not None and proc.poll() is not None:
            log(f"the server exited during the run ({proc.returncode}); its log: {log_path}")
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    finally:
        if proc is not None:
            stop_server(proc)
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    leaked = summary["leaked_kv_slots"]
    ok = summary["server_errors_5xx"] == 0 and leaked == 0
    print(f"result: {'PASS' if ok else 'FAIL'} (5xx {summary['server_errors_5xx']}, leaked KV slots {leaked})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
