"""The scheduler process: owns the model, the KV pool and the radix cache, runs continuous batching
on its main thread, and sends every step's new tokens to the detokenizer."""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import zmq

from arborlm.runtime.config import EngineArgs
from arborlm.runtime.engine_core import EngineCore
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.scheduler.req import Req
from arborlm.runtime.scheduler.stop_text import stream_safe_len
from arborlm.runtime.server import io_struct as io
from arborlm.runtime.server.procutil import Endpoints, init_child, parent_alive

logger = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 10.0


class SchedulerProcess:
    def __init__(self, core: EngineCore, endpoints: Endpoints, stream_interval: int = 1):
        self.core = core
        self.stream_interval = stream_interval
        self.sched = core.scheduler
        ctx = zmq.Context()
        self.recv = ctx.socket(zmq.PULL)
        self.recv.bind(endpoints.scheduler)
        self.send = ctx.socket(zmq.PUSH)
        self.send.connect(endpoints.detokenizer)
        self.sent: dict[str, list[int]] = {}  # rid -> [output ids, output logprobs, input logprobs] already sent
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step, for throughput
        self.generated_tokens = 0

    def serve(self, ppid: int) -> None:
        while True:
            if not self.sched.has_work():
                if self.core.compiling:  # wait for messages, or for a grammar to finish compiling
                    self.recv.poll(5)
                elif not self.recv.poll(1000):
                    if not parent_alive(ppid):
                        return
                    continue
            while True:
                try:
                    self.handle(self.recv.recv_pyobj(zmq.NOBLOCK))
                except zmq.Again:
                    break
            outs, failed = self.core.step()
            items = [self.error_out(req.rid, str(e), 400) if isinstance(e, BadRequestError)
                     else self.error_out(req.rid, f"{type(e).__name__}: {e}", 500) for req, e in failed]
            n_new = 0
            for o in outs:
                n_new += len(o.new_ids)
                if self.due(o.req):
                    items.append(self.token_out(o.req))
            if n_new:
                self.generated_tokens += n_new
                self.recent.append((time.monotonic(), n_new))
            if items:
                self.send.send_pyobj(io.BatchTokenOut(items))

    def handle(self, msg) -> None:
        if isinstance(msg, io.GenerateReq):
            try:
                self.core.submit(msg)
            except BadRequestError as e:
                self.send.send_pyobj(io.BatchTokenOut([self.error_out(msg.rid, str(e), 400)]))
                return
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the scheduler
                logger.exception("request %s could not be queued", msg.rid)
                self.send.send_pyobj(io.BatchTokenOut([self.error_out(msg.rid, f"{type(e).__name__}: {e}", 500)]))
                return
            self.sent[msg.rid] = [0, 0, 0]
        elif isinstance(msg, io.AbortReq):
            req = self.core.abort(msg.rid)
            if req is not None:
                self.send.send_pyobj(io.BatchTokenOut([self.token_out(req)]))
        elif isinstance(msg, io.FlushCacheReq):
            self.send.send_pyobj(io.Reply(msg.reply_id, self.core.flush_cache()))
        elif isinstance(msg, io.StatsReq):
            self.send.send_pyobj(io.Reply(msg.reply_id, self.stats()))
        else:
            logger.error("unknown message %r", type(msg))

    def due(self, req: Req) -> bool:
        """Report finished requests, every first token (for time-to-first-token, and to tell the
        HTTP process the request left the queue; a constrained one's is held back, see token_out),
        and streamed requests every stream_interval tokens; the rest wait for the end (less work
        per step for the detokenizer and the HTTP process, which share the cores with the model)."""
        if req.finished or req.output_ids and self.sent.get(req.rid, [0])[0] == 0:
            return True
        interval = req.params.stream_interval or self.stream_interval
        return req.stream and len(req.output_ids) - self.sent.get(req.rid, [0])[0] >= interval

    def token_out(self, req: Req) -> io.TokenOut:
        sent = self.sent.get(req.rid, [0, 0, 0])
        first = sent == [0, 0, 0]
        # jump-forward may re-tokenise a constrained request's last token: hold it back until the end
        n_out = len(req.output_ids) - (1 if req.grammar is not None and not req.finished else 0)
        new_ids = req.output_ids[sent[0]:n_out]
        text_ids = new_ids
        reason = req.finish_reason
        if reason and reason["type"] == "stop" and isinstance(reason.get("matched"), int) and not req.params.no_stop_trim:
            text_ids = new_ids[:-1]  # the matched stop token stays out of the text
        text_len = safe_len = None
        if reason and reason["type"] == "stop" and isinstance(reason.get("matched"), str) and req.detok is not None:
            text_len = len(req.detok.text)
        elif not req.finished and req.stream and req.params.stop_regex and req.detok is not None:
            safe_len = stream_safe_len(req.detok.text, req.params)
        out = io.TokenOut(
            rid=req.rid, new_ids=new_ids, text_ids=text_ids, finished=req.finished, finish_reason=reason,
            text_len=text_len, safe_len=safe_len, prompt_tokens=len(req.prompt_ids), cached_tokens=req.cached_tokens,
            output_logprobs=req.output_logprobs[sent[1]:], output_top_logprobs=req.output_top_logprobs[sent[1]:],
            input_logprobs=req.input_logprobs[sent[2]:], input_top_logprobs=req.input_top_logprobs[sent[2]:],
            detok_opts=(req.params.skip_special_tokens, req.params.spaces_between_special_tokens,
                        max((len(s) for s in req.params.stop), default=1) - 1) if first else None,
        )
        if req.finished:
            self.sent.pop(req.rid, None)
        else:
            self.sent[req.rid] = [n_out, len(req.output_logprobs), len(req.input_logprobs)]
        return out

    def error_out(self, rid: str, message: str, status: int) -> io.TokenOut:
        self.sent.pop(rid, None)
        return io.TokenOut(rid=rid, new_ids=[], text_ids=[], finished=True, finish_reason={"type": "abort"},
                           error=message, error_status=status)

    def stats(self) -> dict:
        now = time.monotonic()
        while self.recent and now - self.recent[0][0] > THROUGHPUT_WINDOW_S:
            self.recent.popleft()
        c = self.sched.counters()
        c["gen_throughput"] = sum(n for _, n in self.recent) / THROUGHPUT_WINDOW_S
        c["generated_tokens"] = self.generated_tokens
        c["free_request_rows"] = self.core.runner.req_pool.available()
        c["max_running_requests"] = self.core.runner.req_pool.max_requests
        graphs = self.core.runner.decode_graphs
        c["decode_graphs"] = graphs.state() if graphs is not None else None
        return c


def run_scheduler_process(args: EngineArgs, endpoints: Endpoints, ready, log_level: str = "info",
                          stream_interval: int = 1) -> None:
    ppid = os.getppid()
    init_child("scheduler", log_level)
    try:
        core = EngineCore(args)
        proc = SchedulerProcess(core, endpoints, stream_interval)
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, which exits with it
        logger.exception("scheduler failed to start")
        ready.send(("error", f"{type(e).__name__}: {e}"))
        return
    r = core.runner
    ready.send(("ready", io.ReadyInfo(r.files.model_dir, r.files.tokenizer_dir, r.context_length,
                                      r.vocab_size, r.kv_pool.size)))
    proc.serve(ppid)
