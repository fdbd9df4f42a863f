#!/usr/bin/env python
"""Structured generation on real-world JSON Schemas (tests/data/real_world_schemas: SchemaStore and
Kubernetes, see its README): what share gives a valid document.

Every schema is sent as `json_schema` with max_new_tokens --max-new (512), greedy, all at once through
the Engine (continuous batching), in the default (non-strict) mode. Each ends as one of:
  refused      400 at submission (a schema the backend cannot compile even relaxed)
  error        any other failure (must be 0)
  valid        the document validates (checked here with jsonschema, independently of the flag)
  flagged      the response said json_schema_valid=false (it validates not, and says so)
  silent       json_schema_valid=true but the document does not validate (must be 0)
  truncated    finish_reason length (counted within flagged)
Also: compile time p50 / p99 per schema (the backend's compile, no cache), and the old behaviour
beside: how many the pre-issue-14 rules (no annotation dropping, every unenforced keyword refused)
would have refused. Prints the CPU and the backend.

    python benchmarks/bench_schemas.py                         # xgrammar, bf16
    python benchmarks/bench_schemas.py --backend outlines --limit 50
    python benchmarks/bench_schemas.py --stride 3            # every third schema: a quicker mixed sample
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import jsonschema

DATA = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "real_world_schemas")


def load(limit: int | None, stride: int = 1):
    manifest = json.load(open(os.path.join(DATA, "MANIFEST.json")))[::stride]
    items = [(m["file"], json.load(open(os.path.join(DATA, m["file"])))) for m in manifest]
    return items[:limit] if limit else items


def prompt_for(name: str) -> str:
    title = os.path.splitext(os.path.basename(name))[0].replace("-", " ")
    return f"Write a short example {title} document as JSON.\nJSON:"


def independent_check(text: str, schema: dict) -> bool:
    from arborlm.runtime.constrained.validate import _validator

    try:
        doc = json.loads(text)
        return not any(True for _ in _validator(json.dumps(schema)).iter_errors(doc))
    except Exception:  # noqa: BLE001 - unparseable or unreadable: not valid
        return False


def old_rules_refuse(schema: dict, support) -> bool:
    from arborlm.runtime.constrained.base import GrammarError
    from arborlm.runtime.constrained.schema_check import check_schema

    try:
        check_schema(schema, support)
        return False
    except GrammarError:
        return True
    except Exception:  # noqa: BLE001
        return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="xgrammar")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--stride", type=int, default=1, help="every Nth schema of the manifest (a mixed sample)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from arborlm.runtime import Engine
    from arborlm.runtime.constrained.base import GrammarSpec
    from arborlm.runtime.constrained.schema_check import OUTLINES, XGRAMMAR
    from arborlm.runtime.errors import BadRequestError
    from arborlm.runtime.model.execution import cpu_summary

    items = load(args.limit, args.stride)
    support = XGRAMMAR if args.backend == "xgrammar" else OUTLINES
    with Engine(dtype=args.dtype, grammar_backend=args.backend, max_running_requests=64) as engine:
        backend = engine.core.grammars.backend
        compile_s = []
        for _, schema in items:
            t = time.perf_counter()
            try:
                backend.compile(GrammarSpec("json_schema", json.dumps(schema), strict=False))
            except Exception:  # noqa: BLE001 - counted as refused below
                pass
            compile_s.append(time.perf_counter() - t)

        async def one(name, schema):
            params = {"json_schema": json.dumps(schema), "max_new_tokens": args.max_new, "temperature": 0}
            try:
                return await engine.async_generate(prompt_for(name), params)
            except BadRequestError as e:
                return e
            except Exception as e:  # noqa: BLE001
                return e

        async def run_all():
            return await asyncio.gather(*(one(n, s) for n, s in items))

        t0 = time.perf_counter()
        outs = asyncio.run(run_all())
        wall = time.perf_counter() - t0

    counts = dict(refused=0, error=0, valid=0, flagged=0, silent=0, truncated=0)
    examples: dict[str, list[str]] = {k: [] for k in counts}
    for (name, schema), out in zip(items, outs):
        if isinstance(out, BadRequestError):
            kind = "refused"
            examples[kind].append(f"{name}: {str(out)[:120]}")
        elif isinstance(out, Exception):
            kind = "error"
            examples[kind].append(f"{name}: {type(out).__name__}: {str(out)[:120]}")
        else:
            meta = out["meta_info"]
            ok = independent_check(out["text"], schema)
            if ok and meta.get("json_schema_valid") is True:
                kind = "valid"
            elif not ok and meta.get("json_schema_valid") is True:
                kind = "silent"
            else:
                kind = "flagged"
                examples[kind].append(f"{name}: {meta.get('json_schema_error', '')[:120]}")
            if meta["finish_reason"]["type"] == "length":
                counts["truncated"] += 1
                examples["truncated"].append(name)
        counts[kind] += 1
    old_refused = sum(old_rules_refuse(s, support) for _, s in items)
    n = len(items)
    result = {"cpu": cpu_summary(), "backend": args.backend, "dtype": args.dtype, "schemas": n,
              "max_new_tokens": args.max_new, **counts, "valid_share": counts["valid"] / n,
              "old_rules_refused": old_refused, "compile_p50_ms": 1e3 * statistics.median(compile_s),
              "compile_p99_ms": 1e3 * sorted(compile_s)[min(n - 1, int(0.99 * (n - 1)))], "wall_s": wall}
    if args.json:
        print(json.dumps({**result, "examples": examples}))
        return
    print(f"\nbench_schemas: {n} real-world schemas, {args.backend}, {args.dtype}, max_new_tokens "
          f"{args.max_new}, greedy, non-strict (the default); cpu: {result['cpu']}")
    print(f"valid {counts['valid']} ({100 * counts['valid'] / n:.1f}%, target >= 90%), flagged invalid "
          f"{counts['flagged']} (of which truncated {counts['truncated']}), silently invalid {counts['silent']} "
          f"(target 0), refused {counts['refused']}, errors {counts['error']} (target 0)")
    print(f"old rules (before annotations were dropped and unenforced keywords verified): {old_refused} of {n} refused")
    print(f"compile p50 {result['compile_p50_ms']:.0f} ms, p99 {result['compile_p99_ms']:.0f} ms; "
          f"generation wall {wall:.0f} s")
    for kind in ("refused", "error", "flagged", "silent"):
        for line in examples[kind][:8]:
            print(f"  {kind}: {line}")


if __name__ == "__main__":
    main()
