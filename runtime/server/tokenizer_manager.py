"""The tokenizer manager, in the HTTP process: validates and tokenises requests, sends them to the
scheduler, and hands each request's outputs (from the detokenizer) to the coroutine awaiting it."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
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


class RequestFailed(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


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
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def e2e_latency(self) -> float:
        return (self.finish_time or time.perf_counter()) - self.created


class TokenizerManager:
    def __init__(self, info: io.ReadyInfo, endpoints: Endpoints):
        self.info = info
        self.tokenizer = loader.load_tokenizer(info.tokenizer_dir)
        self.context_length = info.context_length
        self.limits = Limits(info.vocab_size, info.context_length, info.pool_size)
        self.metrics = Metrics()
        self.states: dict[str, ReqState] = {}
        self.replies: dict[str, asyncio.Future] = {}
        self.dead: str | None = None  # set when a child process died: every request fails
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

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, ids: list[int], params: SamplingParams, return_logprob: bool = False,
                       logprob_start_len: int = -1, top_logprobs_num: int = 0,
                       rid: str | None = None, stream: bool = False) -> AsyncIterator[ReqState]:
        """Yield the request's state after every update; the last one has finished=True. Leaving
        early (a disconnect, a cancelled task) aborts the request in the scheduler."""
        if self.dead:
            raise RequestFailed(self.dead, 503)
        rid = rid or uuid.uuid4().hex
        if rid in self.states:
            raise BadRequestError(f"rid: a request with id {rid!r} is already running")
        state = self.states[rid] = ReqState(rid, len(ids))
        self.send.send_pyobj(io.GenerateReq(rid, ids, params, return_logprob, logprob_start_len, top_logprobs_num,
                                            stream))
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
            m.requests.labels(t.finish_reason["type"] if t.finish_reason else "unknown").inc()
        st.event.set()

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]
