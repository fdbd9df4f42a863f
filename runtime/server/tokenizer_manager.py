"""The tokenizer manager, in the HTTP process: validates and tokenises requests, admits them
against the queue limit, sends them to the scheduler, and hands each request's outputs (from the
detokenizer) to the coroutine awaiting it."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import zmq
import zmq.asyncio

from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.request_check import Limits, check_prompt
from arborlm.runtime.model import loader
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.server import io_struct as io
from arborlm.runtime.server.metrics import Metrics
from arborlm.runtime.server.procutil import Endpoints

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("arborlm.requests")


class RequestFailed(Exception):
    def __init__(self, message: str, status: int, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


@dataclass
class ReqState:
    rid: str
    prompt_tokens: int
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: dict | None = None
    cached_tokens: int = 0
    output_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    input_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    error: RequestFailed | None = None
    created: float = field(default_factory=time.perf_counter)
    started: bool = False  # the scheduler has reported on it (it left the queue)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    prompt_ids: list[int] = field(default_factory=list)  # kept only for --log-requests-text

    @property
    def e2e_latency(self) -> float:
        return (self.finish_time or time.perf_counter()) - self.created


class Admission:
    """One HTTP request's sub-requests, from admission to the end of the response: holds their
    places in the queue until each is sent, and writes the request log line once closed."""

    def __init__(self, tm: "TokenizerManager", n: int, route: str, client: str | None, priority: int):
        self.tm, self.pending, self.route, self.client, self.priority = tm, n, route, client, priority
        self.id: str | None = None
        self.states: list[ReqState] = []
        self.created = time.perf_counter()
        self.closed = False
        tm.reserved += n

    def take(self, state: ReqState) -> None:
        """A sub-request was sent: it is counted by its state from now on."""
        self.states.append(state)
        if self.pending:
            self.pending -= 1
            self.tm.reserved -= 1

    def close(self, status: int = 200) -> None:
        if self.closed:
            return
        self.closed = True
        self.tm.reserved -= self.pending
        self.pending = 0
        if self.tm.log_requests:
            self.tm.log_request(self, status)


class TokenizerManager:
    def __init__(self, info: io.ReadyInfo, endpoints: Endpoints, model_name: str = "default",
                 queue_limit: int | None = None, request_timeout: float | None = None,
                 log_requests: bool = False, log_requests_text: bool = False):
        self.info = info
        self.tokenizer = loader.load_tokenizer(info.tokenizer_dir)
        self.context_length = info.context_length
        self.limits = Limits(info.vocab_size, info.context_length, info.pool_size)
        self.metrics = Metrics(model_name)
        self.queue_limit, self.request_timeout = queue_limit, request_timeout
        self.log_requests, self.log_requests_text = log_requests, log_requests_text
        self.states: dict[str, ReqState] = {}
        self.replies: dict[str, asyncio.Future] = {}
        self.dead: str | None = None  # set when a child process died: every request fails
        self.draining = False  # set on SIGTERM: new requests get 503, running ones finish
        self.reserved = 0  # admitted sub-requests not yet sent
        self.finishes: deque[float] = deque()  # finish times over the last minute, for Retry-After
        ctx = zmq.asyncio.Context()
        self.send = ctx.socket(zmq.PUSH)
        self.send.connect(endpoints.scheduler)
        self.recv = ctx.socket(zmq.PULL)
        self.recv.bind(endpoints.tokenizer)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._recv_loop())

    # ---- validation ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        try:
            out = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                                     add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise BadRequestError(f"messages: the chat template failed: {e}") from e
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def check_ids(self, ids: list[int], params: SamplingParams, field_name: str = "input_ids") -> None:
        check_prompt(ids, params, self.limits, field_name)

    # ---- admission ---------------------------------------------------------------------------
    def queued(self) -> int:
        """Sub-requests admitted that have not left the scheduler's queue yet."""
        return self.reserved + sum(1 for st in self.states.values() if not st.started)

    def admit(self, n: int, route: str, client: str | None = None, priority: int | None = None) -> Admission:
        """Admit an HTTP request of n sub-requests, or refuse it: 503 while shutting down, 429
        with Retry-After when the queue is full (a request larger than the whole limit still gets
        in when the queue is empty: it would never fit otherwise)."""
        if self.dead:
            raise RequestFailed(self.dead, 503)
        if self.draining:
            self.metrics.rejected("shutting_down")
            raise RequestFailed("the server is shutting down; retry on another replica", 503)
        queued = self.queued()
        if self.queue_limit and queued and queued + n > self.queue_limit:
            self.metrics.rejected("queue_full")
            wait = self.retry_after(queued)
            raise RequestFailed(f"the server is overloaded: {queued} requests are queued (limit "
                                f"{self.queue_limit}); retry in {wait} s", 429, {"Retry-After": str(wait)})
        return Admission(self, n, route, client, priority or 0)

    def retry_after(self, queued: int) -> int:
        """Seconds until the queue has likely drained: its length over the last minute's finish rate."""
        now = time.perf_counter()
        while self.finishes and now - self.finishes[0] > 60:
            self.finishes.popleft()
        if len(self.finishes) < 2:
            return 5
        rate = len(self.finishes) / max(now - self.finishes[0], 1.0)
        return min(60, max(1, math.ceil(queued / rate)))

    def log_request(self, adm: Admission, status: int) -> None:
        sts = adm.states
        firsts = [st.first_token_time for st in sts if st.first_token_time is not None]
        line = {
            "id": adm.id or (sts[0].rid if sts else None), "route": adm.route, "client": adm.client,
            "status": status, "n": len(sts), "priority": adm.priority,
            "prompt_tokens": sum(st.prompt_tokens for st in sts),
            "output_tokens": sum(len(st.output_ids) for st in sts),
            "cached_tokens": sum(st.cached_tokens for st in sts),
            "ttft_s": round(min(firsts) - adm.created, 4) if firsts else None,
            "duration_s": round(time.perf_counter() - adm.created, 4),
            "finish_reason": [st.finish_reason["type"] if st.finish_reason else None for st in sts],
        }
        if self.log_requests_text:
            line["prompt"] = [self.tokenizer.decode(st.prompt_ids) for st in sts]
            line["output"] = [st.text for st in sts]
        request_logger.info("%s", json.dumps(line, ensure_ascii=False))

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, ids: list[int], params: SamplingParams, return_logprob: bool = False,
                       logprob_start_len: int = -1, top_logprobs_num: int = 0,
                       rid: str | None = None, stream: bool = False, priority: int | None = None,
                       admission: Admission | None = None) -> AsyncIterator[ReqState]:
        """Yield the request's state after every update; the last one has finished=True. Leaving
        early (a disconnect, a cancelled task) aborts the request in the scheduler."""
        if self.dead:
            raise RequestFailed(self.dead, 503)
        rid = rid or uuid.uuid4().hex
        if rid in self.states:
            raise BadRequestError(f"rid: a request with id {rid!r} is already running")
        state = self.states[rid] = ReqState(rid, len(ids))
        if self.log_requests_text:
            state.prompt_ids = ids
        if admission is not None:
            admission.take(state)
        timeout = params.timeout if params.timeout is not None else self.request_timeout
        self.send.send_pyobj(io.GenerateReq(rid, ids, params, return_logprob, logprob_start_len, top_logprobs_num,
                                            stream, priority or 0, timeout))
        try:
            while True:
                await state.event.wait()
                state.event.clear()
                if state.error is not None:
                    raise state.error
                yield state
                if state.finished:
                    return
        finally:
            if not state.finished:
                self.abort(rid)
            self.states.pop(rid, None)

    async def generate_final(self, *args, **kwargs) -> ReqState:
        state = None
        async for state in self.generate(*args, **kwargs):
            pass
        return state

    def abort(self, rid: str) -> None:
        if rid in self.states and not self.dead:
            self.send.send_pyobj(io.AbortReq(rid))

    async def ask(self, make, timeout: float = 10.0):
        """Send a FlushCacheReq / StatsReq and await its reply."""
        if self.dead:
            raise RequestFailed(self.dead, 503)
        reply_id = uuid.uuid4().hex
        fut = self.replies[reply_id] = asyncio.get_running_loop().create_future()
        self.send.send_pyobj(make(reply_id))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.replies.pop(reply_id, None)

    def fail_all(self, reason: str) -> None:
        self.dead = reason
        for st in self.states.values():
            st.error = RequestFailed(reason, 503)
            st.event.set()
        for fut in self.replies.values():
            if not fut.done():
                fut.set_exception(RequestFailed(reason, 503))

    # ---- outputs -----------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            msg = await self.recv.recv_pyobj()
            if isinstance(msg, io.BatchStrOut):
                now = time.perf_counter()
                for item in msg.items:
                    self._apply(item, now)
            elif isinstance(msg, io.Reply):
                fut = self.replies.get(msg.reply_id)
                if fut is not None and not fut.done():
                    fut.set_result(msg.value)

    def _apply(self, item: io.StrOut, now: float) -> None:
        t = item.token
        st = self.states.get(t.rid)
        if st is None:  # the caller already left
            return
        if t.error is not None:
            st.error = RequestFailed(t.error, t.error_status)
            st.finished = True
            st.event.set()
            return
        st.started = True
        m = self.metrics
        if t.new_ids:
            if st.first_token_time is None:
                st.first_token_time = now
                m.ttft.observe(now - st.created)
            elif st.last_token_time is not None:
                gap = (now - st.last_token_time) / len(t.new_ids)
                for _ in t.new_ids:
                    m.itl.observe(gap)
            st.last_token_time = now
            m.generation_tokens.inc(len(t.new_ids))
        st.text += item.text_delta
        st.output_ids += t.new_ids
        st.cached_tokens = t.cached_tokens
        st.output_logprobs += t.output_logprobs
        st.output_top_logprobs += t.output_top_logprobs
        st.input_logprobs += t.input_logprobs
        st.input_top_logprobs += t.input_top_logprobs
        if t.finished:
            st.finished, st.finish_reason, st.finish_time = True, t.finish_reason, now
            m.e2e.observe(now - st.created)
            m.prompt_tokens.inc(st.prompt_tokens)
            m.cached_tokens.inc(st.cached_tokens)
            m.finished(t.finish_reason["type"] if t.finish_reason else "unknown")
            self.finishes.append(now)
            while now - self.finishes[0] > 60:
                self.finishes.popleft()
        st.event.set()

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]
