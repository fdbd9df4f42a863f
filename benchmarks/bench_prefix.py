#!/usr/bin/env python
"""Radix prefix cache: arborlm's Engine with the cache on vs off, and scheduling policies under a small KV pool.

Workloads (greedy; exact token-id prompts from seeded English prose, except (b) which uses text):
  (a) few-shot   64 requests = one shared ~1000-token few-shot prefix + a distinct ~30-token question,
                 16 new tokens each (ignore_eos), one engine.generate call. Cache on vs off, plus
                 transformers `generate` (bf16, batch 1) on --hf-requests of them, extrapolated to all.
  (b) chat       16 conversations x 4 turns; each turn re-sends the whole history (chat template, the
                 model's earlier answers as assistant messages), 32 new tokens per answer (ignore_eos, so
                 both configs do equal work); turn k of every conversation is one generate call. On vs off.
  (c) tree       a ~300-token root, 3 branches (+~40 tokens), 3 leaves per branch (+~20): the 3 branch
                 prompts as one batch, then the 9 leaf prompts as one batch, 16 new tokens each. On vs off.
  (d) policies   4 different ~1000-token prefixes x 16 questions, submitted interleaved in one call,
                 with a KV pool of ~--d-pool-frac of the working set: schedule_policy lpm / fcfs / dfs-weight.

Every timed run starts from an empty cache (engine/scheduler flush_cache()); one engine per config is reused,
and the configs of a workload are interleaved run by run so that load from other processes hits them
alike. Medians over --repeats runs. hit rate = sum(cached_tokens) / sum(prompt_tokens).

    python benchmarks/bench_prefix.py                                    # everything (long on 2 cores)
    python benchmarks/bench_prefix.py --scale 0.125 --repeats 1 --hf-requests 1   # smoke run
    python benchmarks/bench_prefix.py --workloads a,d --json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time

SUBJ = ["the old fisherman", "a young engineer", "the city council", "my grandmother", "the orchestra",
        "a tired traveller", "the research team", "the village baker", "a curious student", "the captain",
        "the museum guide", "a quiet librarian", "the farmer next door", "the new manager", "a street musician"]
VERB = ["repaired", "described", "painted", "questioned", "carried", "measured", "forgot", "discovered",
        "rebuilt", "sold", "photographed", "studied", "borrowed", "explained", "defended"]
OBJ = ["a wooden boat", "the broken clock", "an ancient map", "the winter harvest", "a long letter",
       "the railway bridge", "a jar of honey", "the stone tower", "a set of old tools", "the river dam",
       "a basket of apples", "the theory of tides", "a faded photograph", "the mountain path", "a blue kite"]
TAIL = ["before the storm arrived", "during the long summer of 1921", "in a small harbour town",
        "while the market was closing", "with surprising patience", "after years of careful planning",
        "near the edge of the forest", "for reasons nobody understood", "under a pale autumn sky",
        "despite the cold wind from the north", "as the church bell rang", "without telling anyone"]
SP = {"temperature": 0, "ignore_eos": True}
TARGETS = {"a_hf": 16.0, "a_off": 5.0, "a_hit": 0.90, "b_off": 2.0, "d_pol": 1.3}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJ)} {rng.choice(VERB)} {rng.choice(OBJ)} {rng.choice(TAIL)}"
    return s[0].upper() + s[1:]


class Prose:
    """Exact-length token-id prompts built from seeded random sentences."""

    def __init__(self, tokenizer, seed: int):
        self.enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False))
        self.rng = random.Random(seed)

    def fill(self, head: str, n: int, item, tail: str = "") -> list[int]:
        end = self.enc(tail) if tail else []
        ids = self.enc(head)
        while len(ids) < n - len(end):
            ids += self.enc(item())
        return ids[: max(n - len(end), 0)] + end

    def prefix(self, n: int, topic: int = 0) -> list[int]:
        head = f"Task {topic}: answer each question with one short sentence.\n"
        return self.fill(head, n, lambda: f"\nQ: Who {sentence(self.rng)[0].lower()}{sentence(self.rng)[1:]}?"
                                          f"\nA: {sentence(self.rng)}.\n")

    def question(self, n: int) -> list[int]:
        return self.fill("\nQ: Why", n, lambda: f" {sentence(self.rng).lower()}", tail="?\nA:")

    def text(self, n: int, head: str = "") -> list[int]:
        return self.fill(head, n, lambda: f" {sentence(self.rng)}.")


# ---- running -----------------------------------------------------------------------------------------
def guarded(engine, fn, timeout: float):
    """Run fn() in a thread; fail if the engine's loop thread dies or the run exceeds timeout."""
    box: dict = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["err"] = e

    th = threading.Thread(target=target, daemon=True)
    t0 = time.perf_counter()
    th.start()
    while th.is_alive():
        th.join(0.5)
        if th.is_alive() and not engine._thread.is_alive():
            raise RuntimeError("the engine's loop thread died (see its traceback above)")
        if th.is_alive() and time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"run exceeded {timeout:.0f} s")
    if "err" in box:
        raise box["err"]
    return box["out"]


def gen_ids(engine, prompts, new):
    outs = engine.generate(input_ids=prompts, sampling_params={**SP, "max_new_tokens": new})
    bad = [o["meta_info"]["completion_tokens"] for o in outs if o["meta_info"]["completion_tokens"] != new]
    if bad:
        raise RuntimeError(f"asked for {new} tokens, got {bad[:4]}")
    return outs


def chat(engine, firsts, followups, new):
    system = {"role": "system", "content": "You are a helpful assistant. Answer briefly and concretely."}
    convs = [[system, {"role": "user", "content": u}] for u in firsts]
    outs = []
    for turn in range(len(followups) + 1):
        prompts = [engine.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        res = engine.generate(prompt=prompts, sampling_params={**SP, "max_new_tokens": new})
        outs += res
        if turn < len(followups):
            for c, r, u in zip(convs, res, followups[turn]):
                c += [{"role": "assistant", "content": r["text"]}, {"role": "user", "content": u}]
    return outs


def measure(engines: dict, fn, repeats: int, timeout: float) -> dict:
    """Interleave the configs run by run; each run starts from a flushed cache."""
    res = {k: {"runs": []} for k in engines}
    for r in range(repeats):
        for name, eng in engines.items():
            if "error" in res[name]:
                continue
            try:
                flush = getattr(eng, "flush_cache", None) or eng.scheduler.flush_cache  # Engine's is thread-safe
                for _ in range(100):
                    if flush():
                        break
                    time.sleep(0.05)
                else:
                    raise RuntimeError("flush_cache() kept returning False (engine not idle)")
                s, tree = eng.scheduler.stats, eng.scheduler.tree
                retr, evic = s.retractions, tree.evicted_tokens
                t = time.perf_counter()
                outs = guarded(eng, lambda: fn(eng), timeout)
                dt = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - reported in the table
                res[name]["error"] = f"{type(e).__name__}: {e}"
                log(f"  {name}: FAILED: {res[name]['error']}")
                continue
            m = [o["meta_info"] for o in outs]
            run = {"s": dt, "reqs": len(m), "out": sum(x["completion_tokens"] for x in m),
                   "prompt": sum(x["prompt_tokens"] for x in m), "cached": sum(x["cached_tokens"] for x in m),
                   "retractions": s.retractions - retr, "evicted": tree.evicted_tokens - evic}
            res[name]["runs"].append(run)
            log(f"  {name} run {r + 1}/{repeats}: {dt:.2f} s, {run['out'] / dt:.1f} out tok/s, "
                f"hit {run['cached'] / max(run['prompt'], 1):.1%}")
    for v in res.values():
        if v["runs"]:
            med = statistics.median(x["s"] for x in v["runs"])
            last = v["runs"][-1]
            v.update(s=med, tok_s=last["out"] / med, req_s=last["reqs"] / med,
                     hit=sum(x["cached"] for x in v["runs"]) / max(sum(x["prompt"] for x in v["runs"]), 1),
                     retractions=last["retractions"], evicted=last["evicted"])
    return res


def hf_time(model_dir: str, dtype: str, prompts, new: int) -> float:
    """transformers generate, batch 1, one prompt after another; seconds for all of `prompts`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    kw = dict(do_sample=False, num_beams=1, pad_token_id=pad)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:64]]), max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t = time.perf_counter()
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, **kw)
            assert out.shape[1] == len(p) + new, "transformers returned the wrong number of tokens"
        return time.perf_counter() - t


# ---- report ------------------------------------------------------------------------------------------
def ratio(fast: dict, slow: dict):
    """time_slow / time_fast, or None when either failed."""
    return slow["s"] / fast["s"] if fast.get("s") and slow.get("s") else None


def table(title: str, res: dict, extra=()) -> list[str]:
    lines = [title, f"  {'config':<22}{'wall s':>9}{'out tok/s':>11}{'req/s':>8}{'hit rate':>10}{'retract':>9}{'evicted':>9}"]
    for name, v in res.items():
        if "s" not in v:
            lines.append(f"  {name:<22}  FAILED: {v.get('error', 'no run')}")
            continue
        hit, retr, evic = (("-" if v.get(k) is None else format(v[k], f)) for k, f in
                           (("hit", ".1%"), ("retractions", "d"), ("evicted", "d")))
        lines.append(f"  {name:<22}{v['s']:>9.2f}{v['tok_s']:>11.1f}{v['req_s']:>8.2f}{hit:>10}{retr:>9}{evic:>9}")
    return lines + [f"  {x}" for x in extra]


def target(label: str, value, goal: float, pct=False) -> str:
    if value is None:
        return f"{label}: n/a (target >= {goal:.0%})" if pct else f"{label}: n/a (target >= {goal}x)"
    ok = "PASS" if value >= goal else "MISS"
    return f"{label}: {value:.1%} (target >= {goal:.0%}) {ok}" if pct else f"{label}: {value:.2f}x (target >= {goal}x) {ok}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per config; the median is reported")
    ap.add_argument("--scale", type=float, default=1.0, help="scales request/conversation counts and prefix/root "
                                                             "lengths (questions, branches, turns, new tokens stay)")
    ap.add_argument("--hf-requests", type=int, default=8, help="(a): time transformers on this many requests and "
                                                               "extrapolate to all; 0 skips it")
    ap.add_argument("--d-pool-frac", type=float, default=0.25, help="(d): KV pool as a share of the working set")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt text")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed for one timed run")
    ap.add_argument("--json", action="store_true", help="also print all results as one JSON line")
    args = ap.parse_args(argv)
    wls = [w.strip().lower() for w in args.workloads.split(",") if w.strip()]
    if not wls or set(wls) - set("abcd") or args.repeats < 1 or args.scale <= 0:
        ap.error("--workloads takes a subset of a,b,c,d; --repeats >= 1; --scale > 0")

    import torch

    from arborlm.runtime import Engine

    torch.set_num_threads(args.threads)
    sc = lambda n: max(1, round(n * args.scale))  # noqa: E731
    t_all = time.perf_counter()
    make = lambda **kw: Engine(dtype=args.dtype, num_threads=args.threads, **kw)  # noqa: E731
    out_lines, results, checks = [], {}, []
    on_off = {}
    if set(wls) & set("abc"):
        log("building the cache-on and cache-off engines")
        on_off = {"cache on": make(), "cache off": make(disable_radix_cache=True)}
        for e in on_off.values():  # first forward (allocations, lazy imports) outside the timings
            gen_ids(e, [[1, 2, 3, 4, 5, 6, 7, 8]], 2)
    any_engine = next(iter(on_off.values()), None) or make(max_total_tokens=4096)
    prose = Prose(any_engine.tokenizer, args.seed)
    model_dir = any_engine.runner.files.model_dir

    if "a" in wls:
        n, P, Q, N = sc(64), sc(1000), 30, 16
        prefix = prose.prefix(P)
        prompts = [prefix + prose.question(Q) for _ in range(n)]
        log(f"(a) few-shot: {n} x ({P}+{Q}) -> {N}")
        res = measure(on_off, lambda e: gen_ids(e, prompts, N), args.repeats, args.timeout)
        extra = [target("(a) cache on vs off", ratio(res["cache on"], res["cache off"]), TARGETS["a_off"]),
                 target("(a) hit rate (cache on)", res["cache on"].get("hit"), TARGETS["a_hit"], pct=True)]
        k = min(args.hf_requests, n)
        if k > 0:
            log(f"(a) transformers: {k} of {n} requests, batch 1")
            try:
                dt = hf_time(model_dir, args.dtype, prompts[:k], N) * n / k
                res["transformers (b=1)"] = {"s": dt, "tok_s": n * N / dt, "req_s": n / dt, "extrapolated_from": k}
                extra.insert(0, f"transformers timed on {k} of {n} requests, extrapolated x{n / k:.1f} to {n}")
                extra.insert(1, target("(a) cache on vs transformers",
                                       ratio(res["cache on"], res["transformers (b=1)"]), TARGETS["a_hf"]))
            except Exception as e:  # noqa: BLE001
                res["transformers (b=1)"] = {"error": f"{type(e).__name__}: {e}"}
        results["a"] = res
        out_lines += table(f"(a) few-shot: {n} requests x ({P}-token shared prefix + {Q}-token question) -> {N}",
                           res, extra) + [""]

    if "b" in wls:
        n, T, U, N = sc(16), 4, 48, 32
        dec = lambda ids: any_engine.tokenizer.decode(ids)  # noqa: E731
        firsts = [dec(prose.text(U, head=" Please comment on this story:")) for _ in range(n)]
        follow = [[dec(prose.text(U // 2, head=" And then:")) for _ in range(n)] for _ in range(T - 1)]
        log(f"(b) chat: {n} conversations x {T} turns, {N} new tokens per answer")
        res = measure(on_off, lambda e: chat(e, firsts, follow, N), args.repeats, args.timeout)
        extra = [target("(b) cache on vs off", ratio(res["cache on"], res["cache off"]), TARGETS["b_off"])]
        results["b"] = res
        out_lines += table(f"(b) multi-turn chat: {n} conversations x {T} turns (~{U}/{U // 2}-token user turns) "
                           f"-> {N} per answer", res, extra) + [""]

    if "c" in wls:
        R, B, L, N = sc(300), 40, 20, 16
        root = prose.text(R)
        branches = [root + prose.text(B) for _ in range(3)]
        leaves = [b + prose.text(L) for b in branches for _ in range(3)]
        log(f"(c) tree: root {R}, 3 branches +{B}, 9 leaves +{L}, {N} new tokens per node")
        res = measure(on_off, lambda e: gen_ids(e, branches, N) + gen_ids(e, leaves, N), args.repeats, args.timeout)
        r = ratio(res["cache on"], res["cache off"])
        results["c"] = res
        out_lines += table(f"(c) tree: {R}-token root, 3 branches (+{B}) then 9 leaves (+{L}) -> {N} per node", res,
                           [f"(c) cache on vs off: {r:.2f}x (no target)" if r else "(c) cache on vs off: n/a"]) + [""]

    for e in on_off.values():
        e.shutdown()
    if not on_off:
        any_engine.shutdown()

    if "d" in wls:
        K, m, P, Q, N = 4, sc(16), sc(1000), 30, 16
        prefixes = [prose.prefix(P, topic=i + 1) for i in range(K)]
        qs = [[p + prose.question(Q) for _ in range(m)] for p in prefixes]
        prompts = [qs[i][j] for j in range(m) for i in range(K)]  # interleaved: p0q0 p1q0 p2q0 p3q0 p0q1 ...
        ws = K * P + K * m * (Q + N)
        pool = max(int(args.d_pool_frac * ws), P + Q + N)
        log(f"(d) policies: {K} prefixes x {m} questions, KV pool {pool} tokens (working set {ws})")
        engines = {p: make(max_total_tokens=pool, schedule_policy=p) for p in ("lpm", "fcfs", "dfs-weight")}
        for e in engines.values():
            gen_ids(e, [[1, 2, 3, 4, 5, 6, 7, 8]], 2)
        res = measure(engines, lambda e: gen_ids(e, prompts, N), args.repeats, args.timeout)
        for e in engines.values():
            e.shutdown()
        extra = [target("(d) lpm vs fcfs", ratio(res["lpm"], res["fcfs"]), TARGETS["d_pol"]),
                 target("(d) dfs-weight vs fcfs", ratio(res["dfs-weight"], res["fcfs"]), TARGETS["d_pol"]),
                 "(d) target: lpm OR dfs-weight >= 1.3x fcfs"]
        results["d"] = res
        out_lines += table(f"(d) policies: {K} prefixes ({P} tokens) x {m} questions ({Q}) -> {N}, interleaved, "
                           f"KV pool {pool} tokens = max({args.d_pool_frac:.0%} of working set {ws}, longest request)",
                           res, extra) + [""]

    total = time.perf_counter() - t_all
    print(f"\nradix prefix cache benchmark: dtype={args.dtype}, threads={args.threads}, scale={args.scale}, "
          f"median of {args.repeats} run(s), each from an empty cache")
    print("wall s: median wall time of the workload; out tok/s: completion tokens / wall; req/s: requests / wall; "
          "hit rate: sum(cached_tokens) / sum(prompt_tokens); retract/evicted: during the last run\n")
    print("\n".join(out_lines))
    print(f"total benchmark time {total:.0f} s")
    if args.json:
        print(json.dumps({"args": vars(args), "total_s": total, "results": results}))
    failed = any("error" in v for r in results.values() for v in r.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
