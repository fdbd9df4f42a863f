#!/usr/bin/env python
"""Offline throughput: arborlm's Engine vs HuggingFace transformers `generate`, same model, same inputs.

Workloads (greedy decoding, exactly N new tokens: `ignore_eos` for arborlm, `min_new_tokens` for HF):
  W1  one ~64-token prompt -> 128 new tokens             tok/s = 128 / wall time of the generate call
  W2  32 different ~64-token prompts -> 128 new tokens   tok/s = 32*128 / wall time
      arborlm: one engine.generate(list of input_ids) call (continuous batching);
      transformers: one left-padded batch with an attention mask in model.generate.
  W3  one 2048-token prompt, prefill                     tok/s = 2048 / wall time
      arborlm: max_new_tokens=1; transformers: generate with max_new_tokens=1.

Both systems see identical token ids: a fixed English text is tokenised with the engine's tokenizer
and sliced at deterministic offsets (every run, warm-ups included, gets its own slices, so a prefix
cache cannot make a repeat free). Each workload runs once as a warm-up, then `--repeats` times; the
median is reported. Transformers is slow in bf16 on AVX2-only CPUs, so its W2/W3 runs default to a
single timed repeat after a *short* warm-up (`--hf-repeats`, `--hf-warmup`).

Each system is measured in its own subprocess (the script re-invokes itself with `--only NAME`), so
peak RSS (ru_maxrss) and start-up time are clean per system; the parent prints the combined table.

    python benchmarks/bench_offline.py                        # everything, bf16, ~10-15 min on 2 cores
    python benchmarks/bench_offline.py --workloads W1 --repeats 5
    python benchmarks/bench_offline.py --only arborlm         # one system, in this process
    python benchmarks/bench_offline.py --json                 # machine-readable result on stdout
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback

RESULT_TAG = "BENCH_RESULT "
SYSTEMS = ("arborlm", "transformers")
ALL_WORKLOADS = ("W1", "W2", "W3")

W1_PROMPT, W1_NEW = 64, 128
W2_BATCH, W2_PROMPT, W2_NEW = 32, 64, 128
W3_PROMPT = 2048

LABELS = {
    "W1": f"W1 decode b=1 ({W1_PROMPT}->{W1_NEW})",
    "W2": f"W2 batch {W2_BATCH} (~{W2_PROMPT}->{W2_NEW})",
    "W3": f"W3 prefill {W3_PROMPT}",
}

# Varied English prose (history, science, cooking, fiction, travel, economics, ...), tokenised once and
# cycled; any slice of it is an ordinary-looking prompt.
TEXT = """\
The harbour town woke slowly that morning. Fishermen hauled their nets onto the stone quay, gulls
circled above the market stalls, and the baker on Mill Street pulled the first trays of rye bread from
an oven that had been burning since four. Nobody paid much attention to the stranger who stepped off
the early ferry with a battered leather case and a map folded into a very small square.

In 1848 a wave of revolutions swept across Europe. Beginning in Sicily and spreading quickly to France,
the German states, the Austrian Empire and beyond, the uprisings were driven by a mix of economic
hardship, demands for constitutional government, and rising national feeling. Most were suppressed
within a year, yet they left lasting changes: serfdom was abolished in Austria, Denmark adopted a
constitution, and a generation of political thinkers drew very different lessons from the failures.

Photosynthesis converts light energy into chemical energy. In the thylakoid membranes of the
chloroplast, pigments such as chlorophyll absorb photons and drive the splitting of water, releasing
oxygen as a by-product. The energy captured is stored in ATP and NADPH, which the Calvin cycle then uses
to fix carbon dioxide into three-carbon sugars. Roughly half of the oxygen in the atmosphere comes from
microscopic algae in the oceans rather than from forests on land.

To make a simple tomato sauce, warm three tablespoons of olive oil in a wide pan over medium heat. Add
two sliced cloves of garlic and cook until they just begin to colour, then tip in a can of whole
peeled tomatoes and crush them with the back of a wooden spoon. Season with salt, add a pinch of
chilli flakes if you like, and let the sauce simmer for about twenty minutes, stirring now and then,
until it thickens. Finish with torn basil leaves and a little more oil.

A central bank usually tries to keep inflation low and stable. When prices rise too quickly it can
raise its policy interest rate, which makes borrowing more expensive, cools spending and investment,
and eventually slows the growth of wages and prices. Lowering rates has the opposite effect. Because
these changes work with long and variable lags, policymakers must act on forecasts, and they are often
criticised both for moving too late and for moving too early.

The train climbed steadily through the pine forest, its windows fogged with the breath of sleeping
passengers. At the small station near the pass, a conductor in a grey coat stepped down, checked his
watch, and waved a lantern at the driver. Beyond the ridge the valley opened suddenly: terraced
vineyards, a river the colour of slate, and a village whose church bell was ringing for no reason
anyone could later explain.

Software engineers often say that premature optimisation is the root of all evil, but the full quote
is more careful. It warns against spending effort on small efficiencies before measuring where the
time actually goes, while admitting that in the critical three percent of a program, careful tuning
matters a great deal. A good profiler, a reproducible benchmark and a clear hypothesis are usually
worth more than any amount of clever guessing.

Honey bees communicate the location of food through a behaviour called the waggle dance. A forager
returning to the hive runs in a figure-of-eight pattern, and the angle of the straight run relative
to vertical encodes the direction of the flowers relative to the sun, while the duration of the run
signals the distance. Other bees follow the dancer closely, sensing the vibrations and the scent of
the nectar she carries, and then fly out to find the patch themselves.

Mount Everest grows by a few millimetres each year as the Indian plate continues to push beneath the
Eurasian plate. Climbers attempting the summit usually spend weeks acclimatising, moving between base
camp and higher camps so that their bodies produce more red blood cells. Above eight thousand metres,
in the so-called death zone, the air holds roughly a third of the oxygen available at sea level, and
even simple decisions become difficult.

She read the letter twice before folding it back into its envelope. Her grandmother had written it in
1962, in blue ink that had faded to the colour of a winter sky, and it described a garden that no
longer existed: apple trees, a crooked wooden bench, and a pond where, according to the letter, a
single enormous carp had lived for more than thirty years and was known to the whole street as the
Mayor.

The printing press, developed in Mainz around 1440, made books cheaper and far more plentiful. Within
fifty years presses were operating in hundreds of European cities, and millions of volumes had been
produced. Standardised texts helped the spread of scientific ideas, religious debates and vernacular
literature, and the new trade in books created printers, booksellers and censors in equal measure.

When you learn a new language, regular short practice tends to beat occasional long sessions. Spaced
repetition, in which material is reviewed at gradually increasing intervals, exploits the way memory
consolidates over time. Speaking aloud, even to yourself, helps pronunciation and fluency, and reading
simple stories that you mostly understand builds vocabulary faster than memorising isolated lists.
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- prompts ----------------------------------------------------------------------------------------
class Prompts:
    """Deterministic token-id prompts: slices of the tokenised TEXT, cycled; run r gets its own slices."""

    def __init__(self, tokenizer):
        self.stream = list(tokenizer.encode(TEXT, add_special_tokens=False))
        n = len(self.stream)
        if n < 256:
            raise RuntimeError(f"the benchmark text tokenises to only {n} tokens")
        self.stride = 53
        while math.gcd(self.stride, n) != 1:
            self.stride += 2

    def _slice(self, start: int, length: int) -> list[int]:
        n = len(self.stream)
        return [self.stream[(start + k) % n] for k in range(length)]

    def w1(self, run: int) -> list[int]:
        return self._slice(7 + 211 * run, W1_PROMPT)

    def w2(self, run: int, batch: int = W2_BATCH, new_tokens: int = W2_NEW) -> list[list[int]]:
        # lengths vary in [56, 72] (mean ~64) so the transformers batch really needs left padding
        return [self._slice((run * W2_BATCH + i) * self.stride, W2_PROMPT - 8 + (i * 7) % 17) for i in range(batch)]

    def w3(self, run: int, length: int = W3_PROMPT) -> list[int]:
        return self._slice(389 * run + 3, length)

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(self.stream).encode())
        return h.hexdigest()[:16]


# ---- one system -------------------------------------------------------------------------------------
class ArborBackend:
    name = "arborlm"

    def __init__(self, dtype: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        from arborlm.runtime import Engine

        t1 = time.perf_counter()
        self.engine = Engine(dtype=dtype, num_threads=threads)
        out = self.engine.generate(input_ids=[1, 2, 3, 4, 5, 6, 7, 8],
                                   sampling_params={"temperature": 0, "max_new_tokens": 1, "ignore_eos": True})
        t2 = time.perf_counter()
        if len(out["output_ids"]) != 1:
            raise RuntimeError(f"arborlm: the tiny start-up request returned {len(out['output_ids'])} tokens, not 1")
        self.import_s, self.startup_s = t1 - t0, t2 - t0
        self.tokenizer = self.engine.tokenizer
        self.cached_tokens = 0

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        sp = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
        outs = self.engine.generate(input_ids=prompts, sampling_params=sp)
        if not isinstance(outs, list) or len(outs) != len(prompts):
            raise RuntimeError(f"arborlm: {len(prompts)} prompts in, got {type(outs).__name__} "
                               f"of length {len(outs) if isinstance(outs, list) else '-'} back")
        res = []
        for i, o in enumerate(outs):
            ids, meta = o["output_ids"], o["meta_info"]
            if len(ids) != new_tokens or meta.get("completion_tokens") != new_tokens:
                raise RuntimeError(f"arborlm: prompt {i}: asked for {new_tokens} tokens, got len(output_ids)="
                                   f"{len(ids)}, completion_tokens={meta.get('completion_tokens')}, "
                                   f"finish_reason={meta.get('finish_reason')}")
            if meta.get("prompt_tokens") != len(prompts[i]):
                raise RuntimeError(f"arborlm: prompt {i}: prompt_tokens={meta.get('prompt_tokens')}, "
                                   f"expected {len(prompts[i])}")
            self.cached_tokens += int(meta.get("cached_tokens") or 0)
            res.append(list(ids))
        return res

    def close(self):
        self.engine.shutdown()


class HFBackend:
    name = "transformers"

    def __init__(self, dtype: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        from transformers import AutoModelForCausalLM

        from arborlm.runtime.model.loader import load_tokenizer, resolve_model

        t1 = time.perf_counter()
        files = resolve_model(None)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(files.model_dir, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = load_tokenizer(files.tokenizer_dir)
        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = gc.pad_token_id if gc.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.generate([[1, 2, 3, 4, 5, 6, 7, 8]], 1)
        t2 = time.perf_counter()
        self.import_s, self.startup_s = t1 - t0, t2 - t0
        self.cached_tokens = 0

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      pad_token_id=self.pad_id)
        new = out[:, width:]
        if new.shape[1] != new_tokens:
            raise RuntimeError(f"transformers: asked for {new_tokens} tokens, got {new.shape[1]}")
        res = new.tolist()
        for i, row in enumerate(res):
            if any(t in self.eos_ids for t in row):
                raise RuntimeError(f"transformers: prompt {i}: EOS/padding inside the {new_tokens} new tokens")
        return res

    def close(self):
        pass


def hf_runs(args, wl: str) -> int:
    spec = args.hf_repeats
    if spec is None:
        return args.repeats if wl == "W1" else 1
    return spec.get(wl, spec.get("*", args.repeats if wl == "W1" else 1))


def run_system(name: str, args) -> dict:
    """Measure one system in this process; return a JSON-able dict."""
    log(f"{name}: starting (dtype={args.dtype}, threads={args.threads})")
    res: dict = {"system": name, "dtype": args.dtype, "threads": args.threads, "workloads": {},
                 "loadavg_start": os.getloadavg()[0]}
    try:
        be = (ArborBackend if name == "arborlm" else HFBackend)(args.dtype, args.threads)
    except Exception as e:  # noqa: BLE001 - reported, not fatal to the parent
        traceback.print_exc()
        res["error"] = f"start-up failed: {type(e).__name__}: {e}"
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return res
    res["import_s"], res["startup_s"] = be.import_s, be.startup_s
    log(f"{name}: start-up {be.startup_s:.2f} s (of which imports {be.import_s:.2f} s)")
    prompts = Prompts(be.tokenizer)
    res["text_tokens"], res["prompt_digest"] = len(prompts.stream), prompts.digest()

    for wl in args.workloads:
        is_hf = name == "transformers"
        repeats = hf_runs(args, wl) if is_hf else args.repeats
        short_warmup = is_hf and args.hf_warmup == "short" and wl in ("W2", "W3")
        if wl == "W1":
            tokens, new = W1_NEW, W1_NEW
            make = lambda r: [prompts.w1(r)]  # noqa: E731
            warm = make(0)
        elif wl == "W2":
            tokens, new = W2_BATCH * W2_NEW, W2_NEW
            make = prompts.w2
            warm = prompts.w2(0)[:4] if short_warmup else make(0)
        else:
            tokens, new = W3_PROMPT, 1
            make = lambda r: [prompts.w3(r)]  # noqa: E731
            warm = [prompts.w3(0, 256)] if short_warmup else make(0)
        wres: dict = {"tokens_per_run": tokens, "runs": repeats, "warmup": "short" if short_warmup else "full",
                      "times_s": []}
        res["workloads"][wl] = wres
        try:
            warm_new = 8 if (short_warmup and wl == "W2") else new
            t = time.perf_counter()
            be.generate(warm, warm_new)
            log(f"{name} {wl}: warm-up{' (short)' if short_warmup else ''} {time.perf_counter() - t:.2f} s")
            for r in range(1, repeats + 1):
                ps = make(r)
                t = time.perf_counter()
                outs = be.generate(ps, new)
                dt = time.perf_counter() - t
                wres["times_s"].append(dt)
                log(f"{name} {wl}: run {r}/{repeats} {dt:.2f} s = {tokens / dt:.1f} tok/s")
                if wl in ("W1", "W2"):
                    wres.setdefault("outputs", {})[str(r)] = outs  # for the greedy-agreement check
            med = statistics.median(wres["times_s"])
            wres["median_s"], wres["tok_s"] = med, tokens / med
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            wres["error"] = f"{type(e).__name__}: {e}"
            log(f"{name} {wl}: FAILED: {wres['error']}")
    be.close()
    res["cached_tokens_total"] = be.cached_tokens
    res["loadavg_end"] = os.getloadavg()[0]
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return res


# ---- the parent ---------------------------------------------------------------------------------------
def run_child(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--_child",
           "--workloads", ",".join(args.workloads), "--repeats", str(args.repeats), "--dtype", args.dtype,
           "--threads", str(args.threads), "--hf-warmup", args.hf_warmup]
    if args.hf_repeats_raw:
        cmd += ["--hf-repeats", args.hf_repeats_raw]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"system": name, "error": f"subprocess timed out after {args.child_timeout} s", "workloads": {}}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_s"] = time.perf_counter() - t
            if p.returncode != 0:
                res.setdefault("error", f"subprocess exited with {p.returncode}")
            return res
    return {"system": name, "error": f"subprocess exited with {p.returncode} and no result line", "workloads": {}}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(results: dict) -> dict:
    """Greedy outputs of the two systems on the same prompts: mean common-prefix length per workload."""
    out = {}
    a, h = results.get("arborlm", {}), results.get("transformers", {})
    for wl in ("W1", "W2"):
        ao = a.get("workloads", {}).get(wl, {}).get("outputs", {})
        ho = h.get("workloads", {}).get(wl, {}).get("outputs", {})
        runs = sorted(set(ao) & set(ho))
        if not runs:
            continue
        pref = [common_prefix(x, y) for r in runs for x, y in zip(ao[r], ho[r])]
        out[wl] = {"sequences": len(pref), "mean_common_prefix": statistics.mean(pref),
                   "min_common_prefix": min(pref), "identical": sum(p == len(x) for p, x in
                                                                     zip(pref, [x for r in runs for x in ao[r]]))}
    return out


def fmt(x, spec=".1f", dash="-"):
    return dash if x is None else format(x, spec)


def print_table(results: dict, args, file=sys.stdout) -> None:
    systems = [s for s in SYSTEMS if s in results]
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p()
    p(f"arborlm vs transformers, dtype={args.dtype}, torch threads={args.threads}, "
      f"greedy, median of runs (after 1 warm-up)")
    head = f"{'workload':<26}"
    for s in systems:
        head += f"{s + ' tok/s':>20}{'(s/run, runs)':>16}"
    if len(systems) == 2:
        head += f"{'ratio':>10}"
    p(head)
    p("-" * len(head))
    for wl in args.workloads:
        line = f"{LABELS[wl]:<26}"
        toks = {}
        for s in systems:
            w = results[s].get("workloads", {}).get(wl, {})
            if "error" in w or (results[s].get("error") and not w.get("tok_s")):
                line += f"{'FAILED':>20}{'':>16}"
                continue
            toks[s] = w.get("tok_s")
            runs = f"({fmt(w.get('median_s'), '.2f')}, {w.get('runs', '-')})"
            line += f"{fmt(toks[s]):>20}{runs:>16}"
        if len(systems) == 2:
            a, h = toks.get("arborlm"), toks.get("transformers")
            line += f"{(fmt(a / h, '.2f') + 'x') if a and h else '-':>10}"
        p(line)
    for key, label, spec in (("startup_s", "startup (s)", ".2f"), ("peak_rss_mb", "peak RSS (MB)", ".0f")):
        line = f"{label:<26}"
        vals = {}
        for s in systems:
            vals[s] = results[s].get(key)
            line += f"{fmt(vals[s], spec):>20}{'':>16}"
        if len(systems) == 2:
            a, h = vals.get("arborlm"), vals.get("transformers")
            line += f"{(fmt(a / h, '.2f') + 'x') if a and h else '-':>10}"
        p(line)
    p()
    p("notes:")
    p("  tok/s: W1 = 128 new tokens / wall time of the generate call (prefill included); "
      "W2 = 32*128 / wall time; W3 = 2048 prompt tokens / wall time (1 new token).")
    p("  startup: with torch already imported, import + arborlm Engine() / transformers from_pretrained "
      "+ tokenizer, until the answer of a 1-token request (arborlm's Engine() imports transformers lazily, so "
      "both include that import). Module imports before construction: "
      + ", ".join(f"{s} {fmt(results[s].get('import_s'), '.2f')} s" for s in systems) + ".")
    p("  peak RSS: ru_maxrss of each system's own subprocess." if not args.in_process
      else "  peak RSS: ru_maxrss of this process.")
    for s in systems:
        ws = results[s].get("workloads", {})
        used = ", ".join(f"{wl}={ws[wl]['runs']}{' (short warm-up)' if ws[wl].get('warmup') == 'short' else ''}"
                         for wl in args.workloads if wl in ws)
        if used:
            p(f"  timed runs {s}: {used}")
    if "transformers" in results and results["transformers"].get("workloads"):
        p("  (transformers W2/W3 default to 1 timed run after a short warm-up: bf16 matmuls are slow on "
          "AVX2-only CPUs; change with --hf-repeats / --hf-warmup full)")
    for s in systems:
        r = results[s]
        if r.get("prompt_digest"):
            p(f"  {s}: text = {r['text_tokens']} tokens, digest {r['prompt_digest']}")
        if r.get("loadavg_end") is not None:
            p(f"  {s}: 1-min load average {r['loadavg_start']:.2f} at start, {r['loadavg_end']:.2f} at end "
              f"({os.cpu_count()} CPUs; above ~{args.threads} means other processes competed for the cores)")
        if r.get("cached_tokens_total"):
            p(f"  {s}: prefix cache hit on {r['cached_tokens_total']} prompt tokens in total")
    ag = results.get("agreement") or {}
    for wl, g in ag.items():
        p(f"  greedy agreement {wl}: {g['identical']}/{g['sequences']} outputs identical, "
          f"mean common prefix {g['mean_common_prefix']:.1f} tokens (min {g['min_common_prefix']}); "
          f"bf16 rounding makes some divergence normal")
    problems = []
    for s in systems:
        r = results[s]
        if r.get("error"):
            problems.append(f"{s}: {r['error']}")
        for wl, w in r.get("workloads", {}).items():
            if w.get("error"):
                problems.append(f"{s} {wl}: {w['error']}")
    if len(systems) == 2:
        d = {results[s].get("prompt_digest") for s in systems}
        if len(d) > 1 and None not in d:
            problems.append("the two systems tokenised the prompt text differently (digests differ)")
    if problems:
        p("PROBLEMS:")
        for x in problems:
            p(f"  {x}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workloads", default="W1,W2,W3", help="comma-separated subset of W1,W2,W3")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per workload after one warm-up (default 3)")
    ap.add_argument("--hf-repeats", dest="hf_repeats_raw", default=None,
                    help="timed transformers runs: an int for all workloads, or e.g. 'W1=3,W2=1,W3=1' "
                         "(default: --repeats for W1, 1 for W2/W3)")
    ap.add_argument("--hf-warmup", choices=("short", "full"), default="short",
                    help="transformers warm-up for W2/W3: 'short' (4 prompts x 8 tokens / 256-token prefill) "
                         "or 'full' (the workload itself); W1 always warms up in full (default short)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both systems (default 2)")
    ap.add_argument("--only", choices=SYSTEMS, help="measure one system, in this process")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout "
                                                        "(the table then goes to stderr)")
    ap.add_argument("--child-timeout", type=float, default=3600, help="seconds per system subprocess")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in ALL_WORKLOADS]
    if bad or not args.workloads:
        ap.error(f"--workloads: unknown {bad}; choose from {','.join(ALL_WORKLOADS)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.hf_repeats = None
    if args.hf_repeats_raw:
        try:
            if "=" in args.hf_repeats_raw:
                args.hf_repeats = {k.strip().upper(): int(v) for k, v in
                                   (kv.split("=") for kv in args.hf_repeats_raw.split(","))}
            else:
                args.hf_repeats = {"*": int(args.hf_repeats_raw)}
        except ValueError:
            ap.error("--hf-repeats: an int, or W1=N,W2=N,W3=N")
        if any(v < 1 for v in args.hf_repeats.values()):
            ap.error("--hf-repeats must be >= 1")
    args.in_process = args.only is not None
    return args


def strip_outputs(results: dict) -> dict:
    clean = json.loads(json.dumps(results))
    for s in SYSTEMS:
        for w in clean.get(s, {}).get("workloads", {}).values():
            w.pop("outputs", None)
    return clean


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        res = run_system(args.only, args)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    t0 = time.perf_counter()
    results: dict = {}
    if args.only:
        results[args.only] = run_system(args.only, args)
    else:
        for s in SYSTEMS:  # arborlm first: it converts the embedded GGUF to the HF dir if needed
            results[s] = run_child(s, args)
            log(f"{s}: done in {results[s].get('wall_s', 0):.0f} s")
        results["agreement"] = agreement(results)
    results["total_s"] = time.perf_counter() - t0
    print_table(results, args, file=sys.stderr if args.json else sys.stdout)
    print(f"total benchmark time {results['total_s']:.0f} s", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(strip_outputs(results)))
    failed = any(results[s].get("error") or any("error" in w for w in results[s].get("workloads", {}).values())
                 for s in SYSTEMS if s in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
