"""A change signal that wakes waiters anywhere: program threads blocked in `s["v"]`, sync
`text_iter` readers, and `async for` readers on any event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable


class Signal:
    def __init__(self):
        self._cond = threading.Condition()
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
            futures, self._futures = self._futures, []
        for loop, fut in futures:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def wait_for(self, ready: Callable[[], bool]) -> None:
        with self._cond:
            self._cond.wait_for(ready)

    async def await_for(self, ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if ready():
                    return
                fut = loop.create_future()
                self._futures.append((loop, fut))
            await fut


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
