"""`@function` programs and how they run: `run` / `arun` for one, `run_batch` for many.

Each program is a pair of asyncio tasks on one loop: its executor (applying expressions) and its
driver (running the body, then closing the executor). Plain-function bodies run on a thread pool
since they may block reading a variable; `async def` bodies run on the loop itself."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import traceback

from tqdm.auto import tqdm

from arborlm.lang import ir, loop
from arborlm.lang.backend import GenerateCall, resolve
from arborlm.lang.interpreter import Executor, ProgramError
from arborlm.lang.state import ProgramState
from arborlm.lang.tracer import constant_exprs

logger = logging.getLogger(__name__)

SAMPLING_ARGS = {f.name for f in dataclasses.fields(ir.SglSamplingParams)}


def _defaults(kwargs: dict) -> ir.SglSamplingParams:
    """Pop the run's default sampling arguments out of the program's keyword arguments."""
    if "max_tokens" in kwargs:
        kwargs["max_new_tokens"] = kwargs.pop("max_tokens")
    return ir.SglSamplingParams(**{k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING_ARGS})


def _location(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class Function:
    def __init__(self, func):
        self.func = func
        self.is_async = inspect.iscoroutinefunction(func)
        functools.update_wrapper(self, func)

    @property
    def name(self) -> str:
        return self.func.__name__

    def __call__(self, *args, **kwargs):
        """Called with a state, runs inline as part of the caller's program; else like `run`."""
        if args and isinstance(args[0], ProgramState):
            return self.func(*args, **kwargs)
        return self.run(*args, **kwargs)

    # ---- one program -----------------------------------------------------------------------------
    def run(self, *args, backend=None, stream: bool = False, **kwargs) -> ProgramState:
        """Run and return the finished state; with stream=True return at once (read it with text_iter)."""
        defaults = _defaults(kwargs)
        state, _ = loop.run_sync(self._launch(args, kwargs, backend, defaults, stream))
        return state if stream else state.wait()

    async def arun(self, *args, backend=None, stream: bool = False, **kwargs) -> ProgramState:
        defaults = _defaults(kwargs)
        state, task = await self._launch(args, kwargs, backend, defaults, stream)
        if not stream:
            await task
        return state

    async def _launch(self, args, kwargs, backend, defaults, stream):
        ex = Executor(resolve(backend), defaults, stream)
        ex.start()
        state = ProgramState(ex)
        return state, asyncio.ensure_future(self._drive(state, args, kwargs))

    async def _drive(self, state: ProgramState, args, kwargs) -> ProgramState:
        ex = state._ex
        try:
            if self.is_async:
                state.ret_value = await self.func(state, *args, **kwargs)
            else:
                body = functools.partial(self.func, state, *args, **kwargs)
                state.ret_value = await asyncio.get_running_loop().run_in_executor(loop.bodies, body)
        except Exception as e:  # noqa: BLE001 - kept on the state: other programs keep going
            err = ProgramError(f"program {self.name!r} raised at {_location(e)}: {type(e).__name__}: {e}")
            err.__cause__ = e
            ex.fail(err)
            ex.cancel()
        ex.end()
        await ex.wait_done()
        return state

    # ---- a batch -----------------------------------------------------------------------------------
    def run_batch(self, batch_kwargs: list[dict], *, backend=None, num_threads="auto", concurrency=None,
                  progress_bar: bool = True, generator_style: bool = False, **defaults):
        """Run the program once per kwargs dict, `concurrency` at a time (auto: all, up to 256);
        returns the states in order (a generator of them with generator_style=True). A failed
        program does not stop the others: check `state.error()`."""
        backend = resolve(backend)
        sampling = _defaults(defaults)
        limit = concurrency or (num_threads if num_threads != "auto" else min(max(len(batch_kwargs), 1), 256))
        loop.run_sync(self._warm_prefix(backend, batch_kwargs, sampling))
        sem = asyncio.Semaphore(limit)
        bar = tqdm(total=len(batch_kwargs), desc=self.name, disable=not progress_bar)

        async def one(kwargs):
            async with sem:
                state, task = await self._launch((), dict(kwargs), backend, sampling, False)
                await task
            bar.update(1)
            return state

        futures = [asyncio.run_coroutine_threadsafe(one(kw), loop.background_loop()) for kw in batch_kwargs]

        def results():
            try:
                for f in futures:
                    yield f.result()
            finally:
                bar.close()

        return results() if generator_style else list(results())

    async def _warm_prefix(self, backend, batch_kwargs: list[dict], defaults) -> None:
        """Prefill the program's constant prefix once, so the batch's items all hit the cache."""
        if len(batch_kwargs) < 2 or self.is_async:
            return
        prefix = await self.constant_prefix(backend, list(batch_kwargs[0]), defaults)
        if prefix:
            try:
                await backend.generate(GenerateCall.prefill(prefix))
            except Exception as e:  # noqa: BLE001 - only an optimisation; the programs report real errors
                logger.warning("prefix warm-up failed: %s", e)

    async def constant_prefix(self, backend, arg_names: list[str], defaults=None) -> str:
        exprs = constant_exprs(self.func, arg_names)
        ex = Executor(backend, defaults or ir.SglSamplingParams())
        for e in exprs:
            if isinstance(e, ir.RoleBegin):
                ex.role_begin(e.role, await ex._template())
            elif isinstance(e, ir.RoleEnd):
                ex.role_end(e.role, await ex._template())
            else:
                ex.text += e
        return ex.text
