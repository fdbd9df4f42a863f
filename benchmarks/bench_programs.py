"""DSL programs on arborlm vs the same calls as independent requests to a cache-less server.

(a) few-shot classification: 64 items via run_batch (a long shared few-shot prefix);
(b) tree of thought: a ~300-token problem statement, 3 branches x 3 sub-branches, 8 programs.
The DSL runs against `arborlm serve`; the baseline sends the same prompts as independent /generate
requests (all at once, like the DSL) to a server started with --disable-radix-cache.

    .venv/bin/python benchmarks/bench_programs.py --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

import arborlm.lang as sgl

SHOTS = [(f"Review {i}: the product was {'great' if i % 2 else 'awful'} and I "
          f"{'would' if i % 2 else 'would not'} buy it again because of reason number {i}.",
          "positive" if i % 2 else "negative") for i in range(24)]
FEWSHOT = "Classify each review.\n\n" + "".join(f"{t}\nLabel: {l}\n\n" for t, l in SHOTS)
GREEDY = {"temperature": 0}


@sgl.function
def classify(s, review):
    s += FEWSHOT + review + "\nLabel:" + sgl.gen("label", max_tokens=2)


@sgl.function
def tree(s, question, width=3, tokens=8):
    s += question + "\nThink step by step.\n"
    forks = s.fork(width)
    forks += lambda i: f"Idea {i + 1}:" + sgl.gen("idea", max_tokens=tokens, stop="\n")
    subs = [f.fork(width) for f in forks]  # all sub-branches at once, as the baseline sends them
    for sub in subs:
        sub += lambda j: f"\nDetail {j + 1}:" + sgl.gen("detail", max_tokens=tokens, stop="\n")
    for sub in subs:
        sub.join()
    forks.join()


def tot_question(i: int) -> str:
    """A problem statement of about 300 tokens, as a tree-of-thought prompt carries (distinct per program)."""
    facts = [f"Fact {k}: district {k} of the town uses {120 + 7 * ((i + k) % 13)} litres per person per day, "
             f"and its pipes are {10 + (i * k) % 40} years old." for k in range(12)]
    return (f"Problem {i}: a town of {1000 * (i + 1)} people must cut its water use by a fifth.\n"
            + "\n".join(facts) + "\nQuestion: how can the town save water?")


def reviews(n):
    return [f"Review X{i}: it {'worked well' if i % 3 else 'stopped working'} after {i} days." for i in range(n)]


async def post_all(client, prompts, max_new_tokens, stop=None):
    sp = {"max_new_tokens": max_new_tokens, "temperature": 0, **({"stop": stop} if stop else {})}
    outs = await asyncio.gather(*(client.post("/generate", json={"text": p, "sampling_params": sp}) for p in prompts))
    return [o.json()["text"] for o in outs]


async def baseline_fewshot(url, n):
    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        await post_all(c, [FEWSHOT + r + "\nLabel:" for r in reviews(n)], 2)


async def baseline_tree(url, questions, width=3, tokens=8):
    """The tree's calls, level by level, each a full independent request."""
    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        roots = [f"{q}\nThink step by step.\n" for q in questions]
        level1 = [r + f"Idea {i + 1}:" for r in roots for i in range(width)]
        ideas = await post_all(c, level1, tokens, "\n")
        level2 = [p + idea + f"\nDetail {j + 1}:" for p, idea in zip(level1, ideas) for j in range(width)]
        await post_all(c, level2, tokens, "\n")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--programs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    questions = [tot_question(i) for i in range(args.programs)]
    results = {}
    for name, extra in (("arborlm", {}), ("no-cache", {"disable_radix_cache": True})):
        srv = sgl.Runtime(dtype=args.dtype, **extra)  # an `arborlm serve` subprocess, and its endpoint
        try:
            if name == "arborlm":
                def fewshot():
                    requests = [{"review": r} for r in reviews(args.items)]
                    classify.run_batch(requests, backend=srv, progress_bar=False, **GREEDY)

                def tot():
                    tree.run_batch([{"question": q} for q in questions], backend=srv, progress_bar=False, **GREEDY)
            else:
                def fewshot():
                    asyncio.run(baseline_fewshot(srv.url, args.items))

                def tot():
                    asyncio.run(baseline_tree(srv.url, questions))
            for task, fn, n in (("fewshot", fewshot, args.items), ("tree", tot, args.programs)):
                times = []
                for _ in range(args.repeats):
                    httpx.post(srv.url + "/flush_cache")  # each repeat starts from a cold cache
                    times.append(timed(fn))
                results[(task, name)] = n / statistics.median(times)
        finally:
            srv.shutdown()
    print(f"\n| workload | arborlm DSL (programs/s) | independent requests, no cache (programs/s) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for task, label in (("fewshot", f"(a) few-shot classification, {args.items} items"),
                        ("tree", f"(b) tree of thought 3x3, {args.programs} programs")):
        a, b = results[(task, "arborlm")], results[(task, "no-cache")]
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
