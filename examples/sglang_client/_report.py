"""Shared by the two runners here: run SGLang's test programs, classify and print each outcome."""

from __future__ import annotations

import traceback


def run_and_report(programs) -> int:
    """`programs`: (name, callable, args). Each ends `ok`, `wrong answer` (its own assertion on the
    model's answer failed) or `error` (anything else). Prints a table; returns 1 if any errored."""
    results = {}
    for name, fn, args in programs:
        try:
            fn(*args)
            results[name] = "ok"
        except AssertionError as e:
            results[name] = f"wrong answer ({str(e)[:80]!r})"
        except Exception as e:  # noqa: BLE001 - reported
            results[name] = f"error: {type(e).__name__}: {e}"
            traceback.print_exc()
    for name, r in results.items():
        print(f"{name:20s} {r}")
    n_err = sum(r.startswith("error") for r in results.values())
    n_ok = sum(r == "ok" for r in results.values())
    print(f"\n{len(results)} programs: {n_ok} ok, {len(results) - n_ok - n_err} wrong answers, {n_err} errors")
    return 1 if n_err else 0
