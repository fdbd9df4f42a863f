"""The offline Engine (SGLang's `sgl.Engine` API): the EngineCore front plus a loop thread.

Callers submit requests from any thread or asyncio loop: each prompt is tokenized and checked on
the caller's thread (request_check.py, as the server's tokenizer manager does), then sent as the
same typed messages the scheduler process reads from ZeroMQ (server/io_struct.py) through a queue
to the loop thread. That thread owns the EngineCore (scheduler, model runner and KV pool: all
mutation happens there), runs continuous batching, and hands each request back through its sink.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from dataclasses import dataclass

from arborlm.runtime.config import EngineArgs
from arborlm.runtime.constrained.validate import document_check
from arborlm.runtime.engine_core import EngineCore
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.request_check import check_logprob_options, check_prompt, sample_params
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.scheduler.req import Req
from arborlm.runtime.scheduler.stop_text import stream_safe_len
from arborlm.runtime.server import io_struct as io

logger = logging.getLogger(__name__)

Sink = Callable[[Req, bool, BaseException | None], None]  # (req, finished, error)


class Engine:
    """`Engine(model_path=None, **EngineArgs)`; generate / async_generate / shutdown."""

    def __init__(self, model_path: str | None = None, **kwargs):
        self.args = EngineArgs.from_kwargs(model_path, **kwargs)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._replies: dict[str, Future] = {}
        self._closed = False
        self._init_error: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="arborlm-scheduler", daemon=True)
        self._thread.start()
        ready.wait()
        if self._init_error is not None:
            self._closed = True
            raise self._init_error

    def _run(self, ready: threading.Event) -> None:
        # Every torch op runs on this one thread, model loading included: a second thread that
        # has run torch ops keeps its own OpenMP team, and on 2 cores the two teams halve speed.
        try:
            self.core = EngineCore(self.args, keep_text=True)
            self.runner, self.tokenizer, self.scheduler = self.core.runner, self.core.tokenizer, self.core.scheduler
            self.eos_ids = self.core.eos_ids
            self.core.wake = lambda: self._inbox.put(_Wake())  # a grammar finished compiling
        except BaseException as e:  # noqa: BLE001 - re-raised in the constructor
            self._init_error = e
            ready.set()
            return
        ready.set()
        self._loop()

    # ---- public API ----------------------------------------------------------------------------
    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                 top_logprobs_num=0, stream=False, logprob_start_len=-1):
        """Blocking generation. One prompt gives a dict (a list when n > 1); a list gives a list."""
        args = dict(prompt=prompt, sampling_params=sampling_params, input_ids=input_ids, return_logprob=return_logprob,
                    top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len)
        if stream:
            return self._generate_stream_sync(args)
        msgs, single = self._messages(**args)
        done = threading.Event()
        reqs: dict[str, Req] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def sink(req, finished, error):
            if error is not None:
                errors.append(error)
            if finished or error is not None:
                with lock:
                    reqs[req.rid] = req
                    if len(reqs) == len(msgs):
                        done.set()

        self._submit(msgs, sink)
        done.wait()
        if errors:
            raise errors[0]
        results = [self._result(reqs[m.rid]) for m in msgs]
        return results[0] if single else results

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                             top_logprobs_num=0, stream=False, logprob_start_len=-1):
        """Awaitable generation; with stream=True, an async iterator of incremental chunks."""
        args = dict(prompt=prompt, sampling_params=sampling_params, input_ids=input_ids, return_logprob=return_logprob,
                    top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len)
        if stream:
            return self._stream(args)
        msgs, single = self._messages(**args)
        loop = asyncio.get_running_loop()
        futs = {m.rid: loop.create_future() for m in msgs}

        def sink(req, finished, error):
            if finished or error is not None:
                loop.call_soon_threadsafe(_settle, futs[req.rid], req, error)

        self._submit(msgs, sink)
        try:
            reqs = await asyncio.gather(*futs.values())
        except asyncio.CancelledError:
            for m in msgs:
                self.abort(m.rid)
            raise
        results = [self._result(r) for r in reqs]
        return results[0] if single else results

    def get_stats(self) -> dict:
        """Scheduler and cache counters (a snapshot read from another thread: for monitoring)."""
        return self.scheduler.counters()

    def flush_cache(self) -> bool:
        """Empty the prefix cache; returns False (and does nothing) while requests are in flight."""
        msg = io.FlushCacheReq(uuid.uuid4().hex)
        reply = self._replies[msg.reply_id] = Future()
        self._inbox.put(msg)
        return reply.result()

    def abort(self, rid: str) -> None:
        self._inbox.put(io.AbortReq(rid))

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._inbox.put(_Stop())
            self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ---- requests --------------------------------------------------------------------------------
    def _messages(self, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len):
        """The GenerateReq messages for a call (one per prompt and sample), all checked, and
        whether the answer is a single dict."""
        if (prompt is None) == (input_ids is None):
            raise BadRequestError("pass exactly one of prompt or input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt)
            if not all(isinstance(p, str) for p in prompts):
                raise BadRequestError("prompt: must be a string or a list of strings")
            ids_list = [self.tokenizer.encode(p) for p in prompts]
        else:
            single = bool(input_ids) and isinstance(input_ids[0], int)
            ids_list = [list(input_ids)] if single else [list(x) for x in input_ids]
        check_logprob_options(logprob_start_len, top_logprobs_num, self.core.limits.vocab_size)
        per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids_list)
        if len(per_prompt) != len(ids_list):
            raise BadRequestError("sampling_params: a list must have one entry per prompt")
        msgs = []
        for ids, sp in zip(ids_list, per_prompt):
            params = SamplingParams.from_dict(sp)
            check_prompt(ids, params, self.core.limits, "prompt" if prompt is not None else "input_ids")
            self.core.grammar_for(params)  # start compiling now; a grammar known to be refused raises
            for j in range(params.n):
                msgs.append(io.GenerateReq(uuid.uuid4().hex, ids, params if params.n == 1 else sample_params(params, j),
                                           return_logprob, logprob_start_len, top_logprobs_num))
        return msgs, single and len(msgs) == 1

    def _submit(self, msgs: list[io.GenerateReq], sink: Sink) -> None:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        for m in msgs:
            self._sinks[m.rid] = sink
            self._inbox.put(m)

    def _result(self, req: Req) -> dict[str, Any]:
        meta = {
            "id": req.rid,
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.cached_tokens,
            "finish_reason": req.finish_reason,
            "e2e_latency": (req.finish_time or time.perf_counter()) - req.created,
        }
        meta.update(document_check(req.params, req.detok.text if req.detok else "", req.finished))
        if req.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in req.output_logprobs]
            meta["output_top_logprobs"] = [[[lp, t, None] for lp, t in top] for top in req.output_top_logprobs]
            meta["input_token_logprobs"] = [[lp, t, None] for lp, t in req.input_logprobs]
            meta["input_top_logprobs"] = [[[lp, t, None] for lp, t in top] for top in req.input_top_logprobs]
        return {"text": req.detok.text if req.detok else "", "output_ids": list(req.output_ids), "meta_info": meta}

    # ---- streaming ---------------------------------------------------------------------------
    async def _stream(self, args: dict) -> AsyncIterator[dict]:
        msgs, _ = self._messages(**args)
        if len(msgs) != 1:
            raise BadRequestError("stream=True takes one prompt with n = 1")
        msg = msgs[0]
        msg.stream = True
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._submit(msgs, lambda r, fin, err: loop.call_soon_threadsafe(q.put_nowait, (r, fin, err)))
        sent_text, sent_ids, req = 0, 0, None
        try:
            while True:
                req, fin, err = await q.get()
                if err is not None:
                    raise err
                text = req.detok.text
                end = len(text) if fin else max(sent_text, stream_safe_len(text, req.params))
                chunk = {"text": text[sent_text:end], "output_ids": req.output_ids[sent_ids:],
                         "meta_info": self._result(req)["meta_info"]}
                sent_text, sent_ids = end, len(req.output_ids)
                if chunk["text"] or chunk["output_ids"] or fin:
                    yield chunk
                if fin:
                    return
        finally:
            if req is None or not req.finished:
                self.abort(msg.rid)

    def _generate_stream_sync(self, args: dict):
        """A plain iterator over stream chunks, for callers without an event loop."""
        q: queue.SimpleQueue = queue.SimpleQueue()

        async def pump():
            async for chunk in self._stream(args):
                q.put(chunk)

        def run():
            try:
                asyncio.run(pump())
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)
            q.put(None)

        threading.Thread(target=run, daemon=True).start()
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    # ---- the loop thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if not self._drain(block=not self.scheduler.has_work()):
                break
            outs, failed = self.core.step()
            for req, e in failed:
                self._emit(req, True, e)
            for o in outs:
                if o.finished or o.req.stream:
                    self._emit(o.req, o.finished, None)
        for req in self.core.abort_all():
            self._emit(req, True, RuntimeError("the engine shut down"))
        self.core.shutdown()

    def _drain(self, block: bool) -> bool:
        """Apply the queued messages; return False on stop."""
        try:
            msg = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if isinstance(msg, _Stop):
                return False
            if isinstance(msg, io.GenerateReq):
                try:
                    self.core.submit(msg)
                except Exception as e:  # noqa: BLE001 - the request's own fault (a refused grammar)
                    self._emit(Req(msg.rid, msg.input_ids, msg.params), True, e)
            elif isinstance(msg, io.AbortReq):
                req = self.core.abort(msg.rid)
                if req is not None:
                    self._emit(req, True, None)
            elif isinstance(msg, io.FlushCacheReq):
                self._replies.pop(msg.reply_id).set_result(self.core.flush_cache())
            # a _Wake only ends the wait: the next step admits the requests whose grammar compiled
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _emit(self, req: Req, finished: bool, error: BaseException | None) -> None:
        sink = self._sinks.pop(req.rid, None) if finished else self._sinks.get(req.rid)
        if sink is not None:
            try:
                sink(req, finished, error)
            except RuntimeError:  # the caller's event loop is gone (it stopped listening): drop it
                if not req.finished:
                    self.core.abort(req.rid)
                self._sinks.pop(req.rid, None)


@dataclass
class _Wake:
    """Queued by the grammar compile thread: a constrained request can be admitted."""


@dataclass
class _Stop:
    """Queued by shutdown()."""


def _settle(fut: asyncio.Future, req: Req, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(req)
