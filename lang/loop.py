"""The event loop behind the sync entry points (`run`, `run_batch`): one daemon thread, started
on first use and kept, so HTTP connections and the Engine backend are reused across runs."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()

# Program bodies (plain functions) run here: they only queue expressions, and block a thread
# only while reading a variable, so threads stay few even in a large batch.
bodies = ThreadPoolExecutor(max_workers=512, thread_name_prefix="arborlm-program")


def background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="arborlm-lang-loop", daemon=True).start()
        return _loop


def run_sync(coro):
    """Run a coroutine on the background loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop()).result()
