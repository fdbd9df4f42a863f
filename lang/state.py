"""`s`, the state a program appends to, and the group `s.fork(n)` returns.

Appending only queues an expression for the state's executor; reading (`s["v"]`, `s.text()`)
waits until the executor has got that far. Reads block the calling thread, so a program written as
an `async def` uses the awaitable forms (`await s.get_var_async("v")`, `await s.text_async()`)."""

from __future__ import annotations

import asyncio
import os
import sys
from contextlib import contextmanager
from typing import AsyncIterator, Iterator

from arborlm.lang import ir
from arborlm.lang.interpreter import Cmd, Executor, ForkCmd, JoinCmd, ProgramError

_LANG_DIR = os.path.dirname(os.path.abspath(__file__))


def where() -> str:
    """file:line of the innermost caller outside this package: the program line to blame."""
    f = sys._getframe(1)
    while f is not None and os.path.dirname(os.path.abspath(f.f_code.co_filename)) == _LANG_DIR:
        f = f.f_back
    return "?" if f is None else f"{f.f_code.co_filename}:{f.f_lineno}"


class ProgramState:
    def __init__(self, executor: Executor):
        self._ex = executor
        self.ret_value = None

    # ---- appending -----------------------------------------------------------------------------
    def __iadd__(self, expr):
        self._ex.submit(Cmd(expr, where()))
        return self

    def _append(self, expr, at: str) -> None:
        self._ex.submit(Cmd(expr, at))

    @contextmanager
    def var_scope(self, name: str):
        """Everything appended inside the block becomes variable `name`."""
        self._append(ir.VarScopeBegin(name), where())
        yield
        self._append(ir.VarScopeEnd(name), where())

    @contextmanager
    def _role(self, role: str):
        self._append(ir.RoleBegin(role), where())
        yield
        self._append(ir.RoleEnd(role), where())

    def system(self):
        return self._role("system")

    def user(self):
        return self._role("user")

    def assistant(self):
        return self._role("assistant")

    # ---- reading -------------------------------------------------------------------------------
    def _wait(self, ready) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self._ex.loop
        except RuntimeError:
            on_loop = False
        if on_loop and not ready():
            raise RuntimeError("this read would block the event loop: in an async program use "
                               "`await s.get_var_async(name)` / `await s.text_async()`")
        self._ex.signal.wait_for(ready)

    def _var_ready(self, name: str):
        return lambda: self._ex.var_ready(name)

    def _value(self, name: str, parsed: bool):
        if name not in self._ex.variables:
            raise self._ex.error or KeyError(f"variable {name!r} was never set")
        value = self._ex.variables[name]
        gen = self._ex.parsers.get(name)
        if parsed and gen is not None:
            return [gen.parse(v) for v in value] if isinstance(value, list) else gen.parse(value)
        return value

    def get_var(self, name: str, parsed: bool = False):
        """The variable's text, once generated; parsed=True gives the int / pydantic object / JSON value."""
        self._wait(self._var_ready(name))
        return self._value(name, parsed)

    async def get_var_async(self, name: str, parsed: bool = False):
        await self._ex.signal.await_for(self._var_ready(name))
        return self._value(name, parsed)

    def __getitem__(self, name: str):
        return self.get_var(name)

    def __setitem__(self, name: str, value) -> None:
        """Set variable `name` (e.g. to a parsed value), in order with what is appended (SGLang's set_var);
        on a finished program, at once."""
        if self._ex.done:
            self._ex.parsers.pop(name, None)
            self._ex.set_var(name, value)
        else:
            self._append(ir.SetVar(name, value), where())

    def set_var(self, name: str, value) -> None:
        self[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self._ex.variables

    def get_meta_info(self, name: str) -> dict | None:
        self._wait(self._var_ready(name))
        return self._ex.meta_info.get(name)

    def sync(self) -> None:
        """Wait until every expression appended so far has been applied."""
        self._wait(self._ex.idle)

    def text(self) -> str:
        self.sync()
        return self._ex.text

    async def text_async(self) -> str:
        await self._ex.signal.await_for(self._ex.idle)
        return self._ex.text

    def messages(self) -> list[dict]:
        self.sync()
        return [dict(m) for m in self._ex.messages]

    def error(self) -> BaseException | None:
        return self._ex.error

    def wait(self) -> "ProgramState":
        """Wait for the whole program (useful after run(stream=True))."""
        self._wait(lambda: self._ex.done)
        return self

    # ---- streaming -----------------------------------------------------------------------------
    def text_iter(self, var: str | None = None) -> Iterator[str]:
        """New text as it is generated: the whole state's (var=None) or one variable's."""
        cursor = _Cursor(self._ex, var, with_meta=False)
        while not cursor.final:
            self._ex.signal.wait_for(cursor.ready)
            if (chunk := cursor.take()) is not None:
                yield chunk
        if self._ex.error is not None:
            raise self._ex.error

    async def text_async_iter(self, var: str | None = None, return_meta_data: bool = False) -> AsyncIterator:
        """New text as it is generated; with `return_meta_data` (and a variable), (text, meta_info)
        pairs as SGLang yields them: output logprobs new since the previous pair, with the running
        count in `output_token_logprobs_length`."""
        cursor = _Cursor(self._ex, var, with_meta=return_meta_data and var is not None)
        while not cursor.final:
            await self._ex.signal.await_for(cursor.ready)
            if (chunk := cursor.take()) is not None:
                yield chunk
        if self._ex.error is not None:
            raise self._ex.error

    # ---- fork ----------------------------------------------------------------------------------
    def fork(self, size: int = 1) -> "ForkGroup":
        """`size` copies of the state as it will be once everything appended so far is applied."""
        at = where()
        children = []
        for _ in range(size):
            ex = Executor(self._ex.backend, self._ex.defaults, self._ex.stream, self._ex.loop)
            ex.fork_start = self._ex.loop.create_future()
            children.append(ex)
        self._ex.children.extend(children)
        for c in children:
            c.start()
        self._ex.submit(ForkCmd(children, at))
        return ForkGroup(self, [ProgramState(c) for c in children])

    def copy(self) -> "ProgramState":
        return self.fork(1)[0]

    def __repr__(self) -> str:
        return f"ProgramState({self._ex.text[-60:]!r})"


class _Cursor:
    """How far one text_iter / text_async_iter has read, so the sync and async loops share the reading."""

    def __init__(self, ex: Executor, var: str | None, with_meta: bool):
        self.ex, self.var, self.with_meta = ex, var, with_meta
        self.sent = self.sent_lp = 0
        self.final = False

    def _current(self) -> tuple[str, bool]:
        """The text so far and whether it is complete."""
        ex, var = self.ex, self.var
        if var is None:
            return ex.text, ex.done
        if var in ex.partial:
            return ex.partial[var], False
        if var in ex.variables:
            return str(ex.variables[var]), True
        return "", ex.done

    def ready(self) -> bool:
        text, final = self._current()
        return final or len(text) > self.sent

    def take(self):
        """The text new since the last take (with its meta_info if asked), or None; sets `final`."""
        text, self.final = self._current()
        if len(text) <= self.sent:
            return None
        chunk, self.sent = text[self.sent :], len(text)
        if not self.with_meta:
            return chunk
        meta = dict(self.ex.partial_meta.get(self.var) or self.ex.meta_info.get(self.var) or {})
        lps = meta.get("output_token_logprobs")
        if isinstance(lps, list):
            meta["output_token_logprobs"] = lps[self.sent_lp :]
            meta["output_token_logprobs_length"] = len(lps)
            self.sent_lp = len(lps)
        return chunk, meta


class ForkGroup:
    def __init__(self, parent: ProgramState, states: list[ProgramState]):
        self.parent, self.states = parent, states

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, state: ProgramState) -> None:
        """What `forks[i] += expr` ends with (Python stores the += result back): the same fork."""
        if state is not self.states[i]:
            raise TypeError("a fork can only be appended to (forks[i] += ...), not replaced")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self):
        return iter(self.states)

    def __iadd__(self, other):
        """Append to every fork; a callable gets the fork's index: `forks += lambda i: ...`."""
        at = where()
        for i, s in enumerate(self.states):
            s._append(other(i) if callable(other) else other, at)
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """gather_variable: each new variable becomes a list on the parent; concate_and_append:
        the forks' new text is appended to the parent."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"join: unknown mode {mode!r}")
        for s in self.states:
            s._ex.end()
        self.parent._ex.submit(JoinCmd([s._ex for s in self.states], mode, where()))


__all__ = ["ProgramState", "ForkGroup", "ProgramError"]
