#!/usr/bin/env python
"""Structured generation: what constraints cost and what jump-forward saves, per grammar backend.

  (a) decode tok/s, JSON-schema constrained vs free, batch 1 and batch 32 (jump-forward off, so
      every token is a masked decode step; output tokens / wall time; target >= 0.9x free)
  (b) end-to-end latency of schema-heavy outputs (long keys, enums, consts), jump-forward on vs
      off, batch 1, greedy (target >= 1.3x faster)
  (c) compile time p50 / p99 over the corpus (arborlm.runtime.constrained.corpus), no cache
  (d) share of the corpus compiled, and share whose greedy output validates (one mixed batch,
      max_new_tokens 2048: room for the JSON guard's default 512-character string bound)

Medians over --repeats runs after a warm-up; the free baseline is measured in the same run.

    python benchmarks/bench_structured.py                    # both backends, bf16
    python benchmarks/bench_structured.py --backends xgrammar --repeats 3
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

from arborlm.runtime.constrained.corpus import REGEXES, SCHEMAS

ROWS = {"type": "array", "minItems": 40, "maxItems": 40,
        "items": {"type": "object", "required": ["id", "ok"],
                  "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}}}}
HEAVY = {"type": "object", "required": [f"field_{n}" for n in ("customer_account_identifier", "shipping_address_line",
                                                                 "billing_postal_code", "preferred_contact_method",
                                                                 "subscription_tier_level", "marketing_consent_given")],
         "properties": {
             "field_customer_account_identifier": {"type": "integer"},
             "field_shipping_address_line": {"type": "string", "maxLength": 12},
             "field_billing_postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
             "field_preferred_contact_method": {"enum": ["electronic_mail_message", "telephone_call_back"]},
             "field_subscription_tier_level": {"const": "enterprise_premium_annual_subscription"},
             "field_marketing_consent_given": {"type": "boolean"}}}
HEAVY["properties"] = {k: HEAVY["properties"][k] for k in HEAVY["required"]}
PROMPT = "Reply with JSON only.\nJSON:"


def timed(engine, prompts, params):
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - t, outs


def median_run(fn, repeats):
    fn()  # warm-up (compiles the grammar, fills the prefix cache the same for every run)
    runs = [fn() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), runs[-1][1]


def decode_tps(engine, batch, repeats, new=128):
    """(free, constrained) output tok/s; the two alternate run by run so load drifts hit both."""
    base = {"temperature": 0, "max_new_tokens": new}
    params = {"free": {**base, "ignore_eos": True}, "json": {**base, "json_schema": json.dumps(ROWS)}}
    prompts = [f"{PROMPT} #{i}" for i in range(batch)]
    tps = {"free": [], "json": []}
    for r in range(repeats + 1):  # the first round warms up
        for kind, p in params.items():
            dt, outs = timed(engine, prompts, p)
            if r:
                tps[kind].append(sum(o["meta_info"]["completion_tokens"] for o in outs) / dt)
    return statistics.median(tps["free"]), statistics.median(tps["json"])


def heavy_latency(engine, repeats):
    p = {"temperature": 0, "max_new_tokens": 200, "json_schema": json.dumps(HEAVY)}
    return median_run(lambda: timed(engine, PROMPT, p), repeats)


def compile_times(backend):
    from arborlm.runtime.constrained.base import GrammarError, GrammarSpec

    specs = [GrammarSpec("json_schema", json.dumps(s)) for s in SCHEMAS.values()]
    specs += [GrammarSpec("regex", r) for r in REGEXES.values()]
    times, ok = [], 0
    for spec in specs:
        t = time.perf_counter()
        try:
            backend.compile(spec)
            ok += 1
        except GrammarError:
            pass
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(0.99 * len(times)))], ok, len(specs)


def corpus_validity(engine):
    import jsonschema

    from arborlm.runtime.errors import BadRequestError

    valid = 0
    items = [("json_schema", n, s) for n, s in SCHEMAS.items()] + [("regex", n, r) for n, r in REGEXES.items()]
    todo = []
    for kind, name, spec in items:
        p = {"temperature": 0, "max_new_tokens": 2048, kind: json.dumps(spec) if kind == "json_schema" else spec}
        try:
            engine.generate(PROMPT, {**p, "max_new_tokens": 1})  # refused specs raise here
            todo.append((kind, spec, p))
        except BadRequestError:
            pass
    outs = engine.generate([f"Write {k} output.\n{PROMPT}" for k, _, _ in todo], [p for _, _, p in todo])
    cut = sum(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    for (kind, spec, _), out in zip(todo, outs):
        try:
            if kind == "regex":
                valid += bool(re.fullmatch(spec, out["text"]))
            else:
                jsonschema.validate(json.loads(out["text"]), spec, format_checker=jsonschema.FormatChecker())
                valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return valid, cut


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["xgrammar", "outlines"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    from arborlm.runtime import Engine

    rows = []
    for name in args.backends:
        r = {"backend": name}
        with Engine(dtype=args.dtype, grammar_backend=name, enable_jump_forward=False, max_total_tokens=32768) as e:
            r["c_p50"], r["c_p99"], r["compiled"], r["total"] = compile_times(e.core.grammars.backend)
            for b in (1, 32):
                r[f"free{b}"], r[f"json{b}"] = decode_tps(e, b, args.repeats)
            r["jf_off"], out_off = heavy_latency(e, args.repeats)
            r["valid"], r["cut"] = corpus_validity(e)
        with Engine(dtype=args.dtype, grammar_backend=name, enable_jump_forward=True, max_total_tokens=32768) as e:
            r["jf_on"], out_on = heavy_latency(e, args.repeats)
        r["jf_same"] = out_on["text"] == out_off["text"]
        r["jf_tokens"] = (out_on["meta_info"]["completion_tokens"], out_off["meta_info"]["completion_tokens"])
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n| backend | (a) b=1 json/free tok/s | (a) b=32 json/free tok/s | (b) heavy JF on / off s | "
          "(c) compile p50 / p99 ms | (d) compiled | (d) valid (cut at max_tokens) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['backend']} | {r['json1']:.1f} / {r['free1']:.1f} = {r['json1'] / r['free1']:.2f}x "
              f"| {r['json32']:.1f} / {r['free32']:.1f} = {r['json32'] / r['free32']:.2f}x "
              f"| {r['jf_on']:.2f} / {r['jf_off']:.2f} = {r['jf_off'] / r['jf_on']:.2f}x faster"
              f"{'' if r['jf_same'] else ' (text differs)'} "
              f"| {r['c_p50'] * 1e3:.0f} / {r['c_p99'] * 1e3:.0f} "
              f"| {r['compiled']}/{r['total']} | {r['valid']}/{r['total']} ({r['cut']}) |")


if __name__ == "__main__":
    main()
