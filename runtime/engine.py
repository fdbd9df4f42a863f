"""The offline Engine (SGLang's `sgl.Engine` API): model, scheduler and a background loop thread.

Callers submit requests from any thread or asyncio loop; the loop thread owns the scheduler, the
model runner and the KV pool (all mutation happens there), runs continuous batching, and hands
results back through per-request sinks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

from arborlm.runtime.config import EngineArgs
from arborlm.runtime.detokenizer import IncrementalDetokenizer
from arborlm.runtime.constrained.validate import document_check
from arborlm.runtime.engine_core import EngineCore
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.scheduler.req import Req
from arborlm.runtime.scheduler.stop_text import stream_safe_len

logger = logging.getLogger(__name__)

Sink = Callable[[Req, bool, BaseException | None], None]  # (req, finished, error)


class Engine:
    """`Engine(model_path=None, **EngineArgs)`; generate / async_generate / shutdown."""

    def __init__(self, model_path: str | None = None, **kwargs):
        self.args = EngineArgs.from_kwargs(model_path, **kwargs)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
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
            self.core = EngineCore(self.args)
            self.runner, self.tokenizer, self.scheduler = self.core.runner, self.core.tokenizer, self.core.scheduler
            self.eos_ids = self.core.eos_ids
            self.core.wake = lambda: self._inbox.put(("wake",))  # a grammar finished compiling
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
        if stream:
            return self._generate_stream_sync(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len)
        reqs, single = self._make_reqs(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len)
        done = threading.Event()
        remaining = [len(reqs)]
        errors: list[BaseException] = []
        lock = threading.Lock()

        def sink(req, finished, error):
            if error is not None:
                errors.append(error)
            if finished or error is not None:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        self._submit(reqs, sink)
        done.wait()
        if errors:
            raise errors[0]
        results = [self._result(r) for r in reqs]
        return results[0] if single else results

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                             top_logprobs_num=0, stream=False, logprob_start_len=-1):
        """Awaitable generation; with stream=True, an async iterator of incremental chunks."""
        if stream:
            return self._stream(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len)
        reqs, single = self._make_reqs(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len)
        loop = asyncio.get_running_loop()
        futs = {r.rid: loop.create_future() for r in reqs}

        def sink(req, finished, error):
            if finished or error is not None:
                loop.call_soon_threadsafe(_settle, futs[req.rid], req, error)

        self._submit(reqs, sink)
        try:
            await asyncio.gather(*futs.values())
        except asyncio.CancelledError:
            for r in reqs:
                self.abort(r.rid)
            raise
        results = [self._result(r) for r in reqs]
        return results[0] if single else results

    def get_stats(self) -> dict:
        """Scheduler and cache counters (a snapshot read from another thread: for monitoring)."""
        return self.scheduler.counters()

    def flush_cache(self) -> bool:
        """Empty the prefix cache; returns False (and does nothing) while requests are in flight."""
        done = threading.Event()
        result = []
        self._inbox.put(("call", lambda: result.append(self.scheduler.flush_cache()), done))
        done.wait()
        return result[0]

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._inbox.put(("stop", None))
            self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ---- requests --------------------------------------------------------------------------------
    def _make_reqs(self, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len):
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
            for ids in ids_list:
                if not all(isinstance(t, int) and 0 <= t < self.runner.vocab_size for t in ids):
                    raise BadRequestError(f"input_ids: token ids must be ints in [0, {self.runner.vocab_size})")
        if not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
            raise BadRequestError(f"top_logprobs_num: must be an int >= 0, got {top_logprobs_num!r}")
        if isinstance(logprob_start_len, bool) or not isinstance(logprob_start_len, int) or logprob_start_len < -1:
            raise BadRequestError(f"logprob_start_len: must be an int >= -1, got {logprob_start_len!r}")
        per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids_list)
        if len(per_prompt) != len(ids_list):
            raise BadRequestError("sampling_params: a list must have one entry per prompt")
        reqs = []
        for ids, sp in zip(ids_list, per_prompt):
            params = SamplingParams.from_dict(sp)
            params.check_vocab(self.runner.vocab_size)
            grammar = self.core.grammar_for(params)
            for i in range(params.n):
                seed = None if params.seed is None else params.seed + i
                req = Req(uuid.uuid4().hex, ids, params, return_logprob=return_logprob,
                          top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len, seed=seed)
                req.detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens,
                                                   params.spaces_between_special_tokens)
                req.grammar_future = grammar
                reqs.append(req)
        if single and reqs[0].params.n > 1:
            single = False
        return reqs, single

    def _submit(self, reqs: list[Req], sink: Sink) -> None:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        for r in reqs:  # validate all before queueing any: a bad batch is rejected whole
            self.scheduler.check(r)
        self._inbox.put(("add", reqs, sink))

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
    async def _stream(self, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len) -> AsyncIterator[dict]:
        reqs, _ = self._make_reqs(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len)
        if len(reqs) != 1:
            raise BadRequestError("stream=True takes one prompt with n = 1")
        req = reqs[0]
        req.stream = True
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._submit(reqs, lambda r, fin, err: loop.call_soon_threadsafe(q.put_nowait, (fin, err)))
        sent_text, sent_ids = 0, 0
        try:
            while True:
                fin, err = await q.get()
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
            if not req.finished:
                self.abort(req.rid)

    def _generate_stream_sync(self, *args):
        """A plain iterator over stream chunks, for callers without an event loop."""
        q: queue.SimpleQueue = queue.SimpleQueue()

        async def pump():
            async for chunk in await self.async_generate(*args[:5], stream=True, logprob_start_len=args[5]):
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
        """Apply queued adds and aborts; return False on stop."""
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            kind = item[0]
            if kind == "stop":
                return False
            if kind == "add":
                for req in item[1]:
                    self._sinks[req.rid] = item[2]
                    try:
                        self.core.add_request(req)
                    except Exception as e:  # noqa: BLE001
                        self._emit(req, True, e)
            elif kind == "wake":  # the next step admits the compiled requests
                pass
            elif kind == "call":  # run a function on the loop thread, which owns the scheduler
                item[1]()
                item[2].set()
            elif kind == "abort":
                req = self.core.abort(item[1])
                if req is not None:
                    self._emit(req, True, None)
            try:
                item = self._inbox.get_nowait()
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


def _settle(fut: asyncio.Future, req: Req, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(req)
