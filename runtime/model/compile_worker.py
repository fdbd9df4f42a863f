"""A decode graph compiled in a process of its own, at low CPU priority.

Compiling a bucket in the serving process (Dynamo's trace, Inductor's codegen, the C++ build)
holds the GIL for seconds at a time and puts more threads than cores on a 2-core machine, where
an OpenMP team that waits on a descheduled thread stalls: the eager steps meanwhile ran up to 10x
slower. This worker builds the same model, compiles and saves the bucket (decode_graph.py names
the file by its key, so the two processes agree), and exits; the serving process then only loads
it, which takes a fraction of a second. Run as `python -m arborlm.runtime.model.compile_worker`
with a pickled (EngineArgs, bucket, saved-graphs folder) on stdin; exit code 0 when the graph is saved.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import pickle
import signal
import sys

PR_SET_PDEATHSIG = 1


def idle_priority() -> None:
    """SCHED_IDLE, for the worker from before its first import and for the C++ compiler it runs:
    CPU time only where the serving process leaves some. With nice 10 instead the worker still took
    time slices from the serving process's OpenMP threads, which each of a step's parallel regions
    waits on (measured on 2 cores, W1 back to back: eager decode 22 tok/s beside a nice-10 worker,
    28 beside an idle one, 2.6 beside a compile on a thread of the serving process)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux
        os.nice(19)


def main() -> int:
    args, bucket, root = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s [compile-worker] %(levelname)s %(message)s")
    for sig in (signal.SIGINT, signal.SIGTERM):  # the serving process decides; it kills us when it stops
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # and the kernel does, if it dies
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1  # one C++ build at a time: the cores are the server's

    from pathlib import Path

    from arborlm.runtime.model import decode_graph
    from arborlm.runtime.model_runner import ModelRunner

    decode_graph.graphs_root = lambda: Path(root)  # the serving process's, wherever it keeps them

    # The same args give the same model, plan and pool shapes, hence the same key and file.
    runner = ModelRunner(dataclasses.replace(args, compile_in_background=False, warmup_decode_bs=0))
    graphs = runner.decode_graphs
    if bucket not in graphs.ready:
        graphs.compiling.add(bucket)
        graphs._warm(bucket)
    return 0 if bucket in graphs.ready and graphs.saved(bucket) else 1


if __name__ == "__main__":
    sys.exit(main())
