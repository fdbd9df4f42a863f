"""The executor behind a program state: one asyncio task per state that applies expressions in
order, awaiting the backend for gen and select while other states' tasks run.

The program body (user code) only enqueues expressions, so it never waits on the model unless it
reads a variable; all state changes happen on the executor's event loop and are announced through
one Signal, which is how blocked readers on other threads or loops wake up."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from arborlm.lang import chat_template as ct
from arborlm.lang import ir
from arborlm.lang.backend.base import Backend, GenerateCall
from arborlm.lang.notify import Signal
from arborlm.lang.select import score_choices


class ProgramError(Exception):
    """A program failed; the message names the variable and the program line responsible."""


@dataclass
class Cmd:
    expr: Any
    where: str = "?"  # file:line of the `s += ...` that queued it


@dataclass
class ForkCmd:
    children: list["Executor"]
    where: str = "?"


@dataclass
class JoinCmd:
    children: list["Executor"]
    mode: str
    where: str = "?"


@dataclass
class Snapshot:
    """What a fork child starts from."""

    text: str
    variables: dict
    meta_info: dict
    messages: list
    role: tuple | None
    parsers: dict = field(default_factory=dict)


_END = object()


class Executor:
    def __init__(self, backend: Backend, defaults: ir.SglSamplingParams, stream: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.backend, self.defaults, self.stream = backend, defaults, stream
        self.loop = loop or asyncio.get_running_loop()
        self.text = ""
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, dict] = {}
        self.parsers: dict[str, ir.Gen] = {}
        self.partial: dict[str, str] = {}  # variables being streamed
        self.partial_meta: dict[str, dict] = {}  # ... and the meta_info of their latest chunk
        self.messages: list[dict] = []
        self.role: tuple | None = None  # (role, text position of its content)
        self.scopes: dict[str, int] = {}
        self.error: BaseException | None = None
        self.done = False
        self.signal = Signal()
        self.submitted = 0  # commands queued (counted by the submitting thread) ...
        self.applied = 0  # ... and applied (counted by the loop): equal when the state is synced
        # Variables a queued command will (re)assign: a read must wait for the new value, not
        # return the old one (a loop reusing a name). Key None: a queued join (names unknown).
        self.writes: dict[str | None, int] = {}
        self._writes_lock = threading.Lock()  # updated by the submitting thread and by the loop
        self.children: list[Executor] = []
        self.fork_start: asyncio.Future | None = None  # set for fork children: the parent's snapshot
        self.fork_len = 0
        self.new_vars: list[str] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    # ---- called from any thread ---------------------------------------------------------------
    def start(self) -> None:
        self.loop.call_soon_threadsafe(self._start)

    def submit(self, item) -> None:
        self.submitted += 1
        with self._writes_lock:
            for name in _writes(item):
                self.writes[name] = self.writes.get(name, 0) + 1
        self.loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, _END)

    def var_ready(self, name: str) -> bool:
        return self.done or (name in self.variables and not self.writes.get(name) and not self.writes.get(None))

    def idle(self) -> bool:
        return self.done or self.applied >= self.submitted

    # ---- the executor task ----------------------------------------------------------------------
    def _start(self) -> None:
        self._task = self.loop.create_task(self._run())

    async def wait_done(self) -> None:
        await self.signal.await_for(lambda: self.done)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        try:
            if self.fork_start is not None:
                self._restore(await self.fork_start)
            while (item := await self._queue.get()) is not _END:
                await self._apply(item)
                self.applied += 1
                with self._writes_lock:
                    for name in _writes(item):
                        self.writes[name] -= 1
                self.signal.notify()
        except asyncio.CancelledError:
            self.fail(ProgramError("the program was cancelled"))
        except ProgramError as e:
            self.fail(e)
        finally:
            self._finish()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    def _finish(self) -> None:
        while not self._queue.empty():  # fork children waiting on this state must not wait forever
            item = self._queue.get_nowait()
            if isinstance(item, ForkCmd):
                for c in item.children:
                    c.fork_start.set_exception(ProgramError(f"fork at {item.where}: the parent state failed"))
        for c in self.children:
            c.end()
        self.done = True
        self.signal.notify()

    async def _apply(self, item) -> None:
        if isinstance(item, ForkCmd):
            return await self._fork(item)
        if isinstance(item, JoinCmd):
            return await self._join(item)
        for expr in (item.expr.items if isinstance(item.expr, ir.ExprList) else [item.expr]):
            try:
                await self._expr(expr)
            except ProgramError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised with where it came from
                raise ProgramError(f"{_describe(expr)} at {item.where}: {type(e).__name__}: {e}") from e

    async def _expr(self, expr) -> None:
        if isinstance(expr, ir.Gen):
            await self._gen(expr)
        elif isinstance(expr, ir.Select):
            await self._select(expr)
        elif isinstance(expr, ir.RoleBegin):
            self.role_begin(expr.role, await self._template())
        elif isinstance(expr, ir.RoleEnd):
            self.role_end(expr.role, await self._template())
        elif isinstance(expr, ir.VarScopeBegin):
            self.scopes[expr.name] = len(self.text)
        elif isinstance(expr, ir.VarScopeEnd):
            self.set_var(expr.name, self.text[self.scopes.pop(expr.name):])
        elif isinstance(expr, ir.SetVar):
            self.parsers.pop(expr.name, None)
            self.set_var(expr.name, expr.value)
        elif isinstance(expr, ir.Expr):
            raise TypeError(f"cannot append {type(expr).__name__}")
        else:
            self.text += str(expr)

    # ---- text, roles, variables -------------------------------------------------------------------
    async def _template(self) -> ct.ChatTemplate:
        info = await self.backend.model_info()
        if not info.chat_template:
            return ct.plain()
        return ct.from_jinja(info.chat_template, info.bos_token, info.eos_token)

    def role_begin(self, role: str, template: ct.ChatTemplate) -> None:
        if self.role is not None:
            raise ValueError(f"{role}: the {self.role[0]} role is still open")
        self.text += template.begin(role, first=not self.messages)
        self.role = (role, len(self.text))

    def role_end(self, role: str, template: ct.ChatTemplate) -> None:
        if self.role is None or self.role[0] != role:
            raise ValueError(f"{role}_end: no open {role} role")
        self.messages.append({"role": role, "content": self.text[self.role[1]:]})
        self.text += template.end(role)
        self.role = None

    def _chat_context(self) -> dict:
        """The finished turns and the open assistant turn's text, for chat-completions backends."""
        prefix = self.text[self.role[1]:] if self.role is not None and self.role[0] == "assistant" else None
        return {"messages": [dict(m) for m in self.messages], "assistant_prefix": prefix}

    def set_var(self, name: str, value, meta: dict | None = None) -> None:
        self.variables[name] = value
        if meta is not None:
            self.meta_info[name] = meta
        self.new_vars.append(name)
        self.signal.notify()

    # ---- gen and select ---------------------------------------------------------------------------
    async def _gen(self, g: ir.Gen) -> None:
        params = g.params.merged(self.defaults)
        call = GenerateCall(text=self.text, sampling_params=params.sampling_dict(), **params.request_dict(),
                            **self._chat_context())
        if (params.n or 1) > 1:  # SGLang's n: the variable is the list of samples, the text goes on with the first
            if self.stream:
                raise ProgramError(f"gen {g.name!r}: n > 1 cannot be streamed")
            outs = await self.backend.generate(call)
            self.text += outs[0]["text"]
            if g.name:
                self.parsers[g.name] = g
                self.set_var(g.name, [o["text"] for o in outs], [{**o["meta_info"], **g.tool_meta(o["text"])} for o in outs])
            return
        if self.stream:
            call.stream = True
            if g.name:
                self.partial[g.name] = ""
            meta, text = {}, ""
            async for chunk in self.backend.generate_stream(call):
                text += chunk["text"]
                self.text += chunk["text"]
                meta = chunk.get("meta_info", meta)
                if g.name:
                    self.partial[g.name] = text
                    self.partial_meta[g.name] = meta
                self.signal.notify()
        else:
            out = await self.backend.generate(call)
            text, meta = out["text"], out["meta_info"]
            self.text += text
        if g.name:
            self.parsers[g.name] = g
            self.set_var(g.name, text, {**meta, **g.tool_meta(text)})
            self.partial.pop(g.name, None)
            self.partial_meta.pop(g.name, None)

    async def _select(self, sel: ir.Select) -> None:
        decision = await score_choices(self.backend, self.text, sel.choices, sel.choices_method, sel.temperature,
                                       chat=self._chat_context())
        self.text += decision.decision
        if sel.name:
            self.set_var(sel.name, decision.decision, decision.meta_info)

    # ---- fork and join ------------------------------------------------------------------------------
    async def _fork(self, cmd: ForkCmd) -> None:
        if len(cmd.children) > 1 and self.text:
            try:  # siblings launched together would each miss the cache: prefill the prefix once
                await self.backend.generate(GenerateCall.prefill(self.text))
            except Exception as e:  # noqa: BLE001
                raise ProgramError(f"fork at {cmd.where}: the prefix warm-up failed: {type(e).__name__}: {e}") from e
        snap = Snapshot(self.text, dict(self.variables), dict(self.meta_info), [dict(m) for m in self.messages],
                        self.role, dict(self.parsers))  # copied now: this state goes on changing
        for c in cmd.children:
            c.fork_start.set_result(snap)

    def _restore(self, snap: Snapshot) -> None:
        self.text, self.variables, self.meta_info = snap.text, dict(snap.variables), dict(snap.meta_info)
        self.messages, self.role, self.parsers = [dict(m) for m in snap.messages], snap.role, dict(snap.parsers)
        self.fork_len = len(snap.text)

    async def _join(self, cmd: JoinCmd) -> None:
        for c in cmd.children:
            await c.wait_done()
            if c.error is not None:
                raise ProgramError(f"join at {cmd.where}: a fork failed: {c.error}") from c.error
        if cmd.mode == "gather_variable":
            for name in dict.fromkeys(n for c in cmd.children for n in c.new_vars):
                self.variables[name] = [c.variables.get(name) for c in cmd.children]
                self.meta_info[name] = [c.meta_info.get(name) for c in cmd.children]
                self.new_vars.append(name)
        elif cmd.mode == "concate_and_append":
            self.text += "".join(c.text[c.fork_len:] for c in cmd.children)
        else:
            raise ProgramError(f"join at {cmd.where}: unknown mode {cmd.mode!r}")


def _writes(item) -> list:
    if isinstance(item, JoinCmd):
        return [None]
    if isinstance(item, Cmd):
        exprs = item.expr.items if isinstance(item.expr, ir.ExprList) else [item.expr]
        return [e.name for e in exprs if isinstance(e, (ir.Gen, ir.Select, ir.VarScopeEnd, ir.SetVar)) and e.name]
    return []


def _describe(expr) -> str:
    if isinstance(expr, (ir.Gen, ir.Select)):
        kind = "gen" if isinstance(expr, ir.Gen) else "select"
        return f"{kind} of variable {expr.name!r}" if expr.name else kind
    return type(expr).__name__
