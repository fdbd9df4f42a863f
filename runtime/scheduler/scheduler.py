"""Continuous batching over the paged KV pool. Pure Python plus index tensors: no model here.

Each step the scheduler forms one batch: admitted waiting requests (a prefill, or a chunk of one,
within the prefill token budget) followed by one decode token for every running request. Finished
requests free their KV at once; new ones join at the next step. Admission reserves the KV a request
can ever need (prompt + max_new_tokens), so a running request never runs out of slots mid-decode.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from arborlm.runtime.cache.memory_pool import ReqToTokenPool, TokenToKVPool
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.scheduler.req import Req, Status


@dataclass
class ScheduleBatch:
    reqs: list[Req]  # extends first, then decodes
    extend_lens: list[int]  # tokens fed this step, per request
    prefix_lens: list[int]  # KV already in the pool, per request
    num_decode: int

    @property
    def samples(self) -> list[bool]:
        """Whether each request reaches the end of its pending tokens this step (and so samples)."""
        return [p + n == r.seq_len for r, p, n in zip(self.reqs, self.prefix_lens, self.extend_lens)]


@dataclass
class StepOutput:
    req: Req
    new_ids: list[int]
    finished: bool


class Scheduler:
    def __init__(self, req_pool: ReqToTokenPool, kv_pool: TokenToKVPool, *, context_length: int,
                 max_running_requests: int, max_prefill_tokens: int, eos_ids: set[int], tokenizer=None):
        self.req_pool = req_pool
        self.kv_pool = kv_pool
        self.context_length = context_length
        self.max_running = min(max_running_requests, req_pool.max_requests)
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.reserved = 0  # slots promised to running requests but not yet allocated

    # ---- admission -------------------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        n = len(req.prompt_ids)
        if n == 0:
            raise BadRequestError("the prompt is empty")
        if n + req.params.max_new_tokens > self.context_length:
            raise BadRequestError(
                f"prompt ({n} tokens) + max_new_tokens ({req.params.max_new_tokens}) exceeds the "
                f"context length ({self.context_length})"
            )
        if req.max_kv > self.kv_pool.size:
            raise BadRequestError(
                f"prompt + max_new_tokens needs {req.max_kv} KV slots; the pool holds {self.kv_pool.size}"
            )
        self.waiting.append(req)

    def abort(self, rid: str) -> Req | None:
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                req.finish({"type": "abort"})
                req.status = Status.FINISHED
                return req
        for req in self.running:
            if req.rid == rid:
                req.finish({"type": "abort"})
                self._release(req)
                return req
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- batch formation -------------------------------------------------------------------
    def schedule(self) -> ScheduleBatch | None:
        reqs, ext, pre = [], [], []
        budget = self.max_prefill_tokens
        # A request mid-chunked-prefill is running but still has more than one pending token.
        for req in self.running:
            if req.pending_len > 1 and budget > 0:
                n = min(req.pending_len, budget)
                self._extend(req, n, reqs, ext, pre)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            need = req.max_kv - req.kv_len
            if self.kv_pool.available() - self.reserved < need or self.req_pool.available() == 0:
                break
            self.waiting.popleft()
            req.row = self.req_pool.alloc()
            req.status = Status.RUNNING
            self.running.append(req)
            self.reserved += need
            n = min(req.pending_len, budget)
            self._extend(req, n, reqs, ext, pre)
            budget -= n
        decodes = [r for r in self.running if r.pending_len == 1 and r not in reqs]
        for req in decodes:
            self._extend(req, 1, reqs, ext, pre)
        if not reqs:
            return None
        return ScheduleBatch(reqs, ext, pre, num_decode=len(decodes))

    def _extend(self, req: Req, n: int, reqs, ext, pre) -> None:
        slots = self.kv_pool.alloc(n)
        assert slots is not None, "admission reserved these slots"
        self.reserved -= n
        self.req_pool.table[req.row, req.kv_len : req.kv_len + n] = slots
        reqs.append(req)
        ext.append(n)
        pre.append(req.kv_len)
        req.kv_len += n

    # ---- results -----------------------------------------------------------------------------
    def process(self, batch: ScheduleBatch, next_ids: list[int | None], logprobs=None, top_logprobs=None) -> list[StepOutput]:
        """Apply one step's sampled tokens (None for rows that did not sample); free finished requests."""
        outs = []
        for i, req in enumerate(batch.reqs):
            if req.finished:  # aborted while the step ran
                continue
            if req.params.max_new_tokens == 0:  # prefill-only: done once the prompt is in the pool
                if req.pending_len == 0:
                    req.finish({"type": "length", "length": 0})
                    self._release(req)
                    outs.append(StepOutput(req, [], True))
                continue
            tok = next_ids[i]
            if tok is None:
                continue
            outs.append(self._append_token(req, tok, logprobs, top_logprobs, i))
        return outs

    def _append_token(self, req: Req, tok: int, logprobs, top_logprobs, i) -> StepOutput:
        p = req.params
        req.output_ids.append(tok)
        if logprobs is not None and logprobs[i] is not None:
            req.output_logprobs.append((logprobs[i], tok))
            req.output_top_logprobs.append(top_logprobs[i] or [])
        may_stop = len(req.output_ids) >= p.min_new_tokens
        matched_token = may_stop and (tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids))
        if req.detok is not None and (not matched_token or p.no_stop_trim):
            req.detok.add([tok])
        if matched_token:
            req.finish({"type": "stop", "matched": tok})
        elif may_stop and p.stop and req.detok is not None and self._match_stop_str(req):
            pass
        elif len(req.output_ids) >= p.max_new_tokens:
            req.finish({"type": "length", "length": p.max_new_tokens})
        if req.finished:
            if req.detok is not None and req.finish_reason["type"] == "length":
                req.detok.flush()
            self._release(req)
        return StepOutput(req, [tok], req.finished)

    def _match_stop_str(self, req: Req) -> bool:
        # Search only the tail that the newest token can have completed a match in.
        text = req.detok.text
        window = req.detok.last_delta_len + max(len(s) for s in req.params.stop) - 1
        start = max(0, len(text) - window)
        hits = [(text.find(s, start), s) for s in req.params.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return False
        pos, s = min(hits)
        if not req.params.no_stop_trim:
            req.detok.text = text[:pos]
        req.finish({"type": "stop", "matched": s})
        return True

    def _release(self, req: Req) -> None:
        """Free a request's KV and table row; return its unused reservation."""
        if req.row is not None:
            self.kv_pool.free(self.req_pool.table[req.row, : req.kv_len].clone())
            self.req_pool.free(req.row)
            self.reserved -= req.max_kv - req.kv_len
            req.row = None
        req.kv_len = 0
        req.status = Status.FINISHED
        if req in self.running:
            self.running.remove(req)
