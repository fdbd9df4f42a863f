"""Compiled grammars, cached and compiled off the scheduler loop.

A new grammar can take a second or more to compile (outlines builds a token index over the whole
vocabulary); compiling on a worker thread lets running requests keep decoding meanwhile, and the
LRU makes every later request with the same spec start at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from arborlm.runtime.constrained.base import Backend, GrammarSpec


class GrammarCache:
    def __init__(self, backend: Backend, max_size: int = 256, workers: int = 1):
        self.backend = backend
        self.max_size = max_size
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix=f"grammar-{backend.name}")
        self.entries: OrderedDict[tuple, Future] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, spec: GrammarSpec) -> Future:
        """A future of the compiled grammar; it raises GrammarError if the spec is refused."""
        key = (self.backend.name, spec)
        with self.lock:
            fut = self.entries.get(key)
            if fut is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self.pool.submit(self.backend.compile, spec)
            self.entries[key] = fut
            if len(self.entries) > self.max_size:
                self.entries.popitem(last=False)
            return fut

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
