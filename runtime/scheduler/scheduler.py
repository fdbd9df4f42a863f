"""Continuous batching over the paged KV pool and the radix cache. Pure Python plus index
tensors: no model here, so it is tested by feeding requests and fake sampled tokens.

Each step forms one batch: a decode token for every running request, chunks of unfinished
prefills, and newly admitted requests (their uncached suffix), within the prefill token budget.
Admission matches the request's prefix in the radix tree and estimates its future decode needs
(SGLang's new-token ratio). When a decode step cannot get its slots, the tree evicts LRU leaves;
if that is not enough, running requests are retracted to the waiting queue (least progress
first), keeping their generated tokens for a later re-prefill. What a sampled token does to its
request (stops, grammar, jump-forward) is output_processor.py's; here finished requests are freed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from arborlm.runtime.cache.memory_pool import ReqToTokenPool, TokenToKVPool
from arborlm.runtime.cache.radix_cache import RadixCache
from arborlm.runtime.request_check import check_fits
from arborlm.runtime.scheduler.policy import order_waiting
from arborlm.runtime.scheduler.req import Req, Status
from arborlm.runtime.scheduler.output_processor import OutputProcessor

IN_BATCH_PREFIX_MIN = 32  # shared uncached tokens that make a request wait for a sibling's prefill


@dataclass
class ScheduleBatch:
    reqs: list[Req]  # extends first, then decodes
    extend_lens: list[int]  # tokens fed this step, per request
    prefix_lens: list[int]  # KV already in the pool, per request
    num_decode: int

    def add(self, req: Req, prefix_len: int, extend_len: int) -> None:
        self.reqs.append(req)
        self.prefix_lens.append(prefix_len)
        self.extend_lens.append(extend_len)

    @property
    def samples(self) -> list[bool]:
        """Whether each request reaches the end of its pending tokens this step (and so samples)."""
        return [p + n == r.seq_len for r, p, n in zip(self.reqs, self.prefix_lens, self.extend_lens)]


@dataclass
class StepOutput:
    req: Req
    new_ids: list[int]
    finished: bool


@dataclass
class SchedulerStats:
    """Counters for the metrics endpoint."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    retractions: int = 0
    finished_requests: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class SchedulerConfig:
    context_length: int
    max_running_requests: int = 256
    chunked_prefill_size: int = 8192  # prefill token budget of one step
    schedule_policy: str = "lpm"
    init_new_token_ratio: float = 0.7  # share of max_new_tokens a request is expected to use
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001
    eos_ids: set[int] = field(default_factory=set)
    low_priority_first: bool = False  # a lower priority value goes first (vLLM); by default a higher one (SGLang)
    priority_aging_s: float = 10.0  # each this long in the waiting queue raises a request's priority by one
    jump_forward: Callable[[Req], int] | None = None  # appends a grammar's forced tokens to a request


class Scheduler:
    def __init__(self, req_pool: ReqToTokenPool, kv_pool: TokenToKVPool, tree: RadixCache, cfg: SchedulerConfig):
        self.req_pool = req_pool
        self.kv_pool = kv_pool
        self.tree = tree
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.max_running = min(cfg.max_running_requests, req_pool.max_requests)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.new_token_ratio = cfg.init_new_token_ratio
        self.stats = SchedulerStats()
        self.outputs = OutputProcessor(cfg)  # stops, grammar, jump-forward

    # ---- admission -------------------------------------------------------------------------
    def check(self, req: Req) -> None:
        """Reject what can never run; reads only fixed limits, so any thread may call it."""
        check_fits(len(req.prompt_ids), req.params.max_new_tokens, self.context_length, self.kv_pool.size)

    def add_request(self, req: Req) -> None:
        self.check(req)
        self.waiting.append(req)

    # ---- priorities ------------------------------------------------------------------------
    def static_priority(self, req: Req) -> int:
        return -req.priority if self.cfg.low_priority_first else req.priority

    def effective_priority(self, req: Req, now: float) -> int:
        """The request's own priority plus one for every aging period since it arrived (kept
        across retractions), so a low priority is never starved: it rises in the queue, and a
        running request aged past a newcomer's priority can no longer be preempted by it."""
        return self.static_priority(req) + int((now - req.created) / self.cfg.priority_aging_s)

    def _preempt(self) -> None:
        """Under the priority policy: when the waiting request with the highest own priority
        cannot be admitted (no free row, or not enough KV), retract the running request with the
        lowest effective priority if that is below the newcomer's own. One per step. Two
        requests never take turns: the retracted one's own priority is below the newcomer's,
        whose effective priority only grows."""
        now = time.perf_counter()
        head = max(self.waiting, key=self.static_priority)
        victim = min(reversed(self.running), key=lambda r: (self.effective_priority(r, now), len(r.output_ids)))
        if self.effective_priority(victim, now) >= self.static_priority(head):
            return
        full = len(self.running) >= self.max_running or self.req_pool.available() == 0
        room = self.kv_pool.available() + self.tree.evictable_size - sum(self._future_need(r) for r in self.running)
        if full or room < head.seq_len + self._future_need(head):
            self._retract(victim)

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

    def counters(self) -> dict:
        """A snapshot for metrics: queue lengths, KV usage, cache effectiveness, pressure events."""
        return {
            "running_requests": len(self.running),
            "waiting_requests": len(self.waiting),
            "free_slots": self.kv_pool.available(),
            "evictable_tokens": self.tree.evictable_size,
            "protected_tokens": self.tree.protected_size,
            "pool_size": self.kv_pool.size,
            "cache_hit_rate": self.stats.hit_rate,
            "prompt_tokens": self.stats.prompt_tokens,
            "cached_tokens": self.stats.cached_tokens,
            "evicted_tokens": self.tree.evicted_tokens,
            "retractions": self.stats.retractions,
            "finished_requests": self.stats.finished_requests,
        }

    def flush_cache(self) -> bool:
        """Drop every cached prefix; only when idle (running requests hold locks in the tree)."""
        if self.has_work():
            return False
        self.tree.evict(self.kv_pool.size)
        return True

    # ---- batch formation -------------------------------------------------------------------
    def schedule(self) -> ScheduleBatch | None:
        if self.cfg.schedule_policy == "priority" and self.waiting and self.running:
            self._preempt()
        decodes = [r for r in self.running if r.pending_len == 1]
        while not self._make_room(len(decodes)):
            victim = self._retract_one()
            if victim in decodes:
                decodes.remove(victim)
        if decodes:
            self.new_token_ratio = max(self.cfg.min_new_token_ratio,
                                       self.new_token_ratio - self.cfg.new_token_ratio_decay)
        for req in decodes:  # their slots first: made room for above
            self._alloc(req, 1)
        batch = ScheduleBatch([], [], [], num_decode=len(decodes))
        budget = self.cfg.chunked_prefill_size
        for req in self.running:  # unfinished chunked prefills go on first
            if req.pending_len > 1 and budget > 0:
                n = min(req.pending_len, budget)
                if not self._make_room(n):
                    break
                self._extend(batch, req, n)
                budget -= n
        if self.waiting and budget > 0:
            self._admit(budget, batch)
        for req in decodes:
            batch.add(req, req.kv_len - 1, 1)
        return batch if batch.reqs else None

    def _extend(self, batch: ScheduleBatch, req: Req, n: int) -> None:
        """Put n more of req's tokens into the batch, with KV slots for them."""
        batch.add(req, req.kv_len, n)
        self._alloc(req, n)

    def _admit(self, budget: int, batch: ScheduleBatch) -> None:
        now = time.perf_counter()
        ordered = order_waiting(self.cfg.schedule_policy, list(self.waiting), self.tree,
                                lambda r: self.effective_priority(r, now))
        future = sum(self._future_need(r) for r in self.running)
        # Prefixes being prefilled in this very step: a request that would compute the same tokens
        # again waits one step and then hits the cache (SGLang's in-batch prefix check).
        in_batch = RadixCache(lambda slots: None)
        for req in ordered:
            if budget <= 0 or len(self.running) >= self.max_running or self.req_pool.available() == 0:
                break
            ids = req.all_ids[: req.seq_len - 1]
            owed = req.input_logprob_start
            if owed is not None:  # prompt logprobs need the logits before that token: recompute them
                ids = ids[: max(owed - 1, 0)]
            slots, node = self.tree.match_prefix(ids)
            if not self.tree.disable:
                shared = len(in_batch.match_prefix(ids)[0])
                if shared - len(slots) >= IN_BATCH_PREFIX_MIN:
                    continue
                in_batch.insert(ids, torch.zeros(len(ids), dtype=torch.int64))
            self.tree.lock(node)
            rest = req.seq_len - len(slots)
            room = self.kv_pool.available() + self.tree.evictable_size - future
            need = rest + self._future_need(req)
            n = min(rest, budget)
            if room < need or not self._make_room(n):
                self.tree.unlock(node)
                break
            self.waiting.remove(req)
            req.row = self.req_pool.alloc()
            req.status = Status.RUNNING
            req.last_node, req.protected_len, req.kv_len = node, len(slots), len(slots)
            self.req_pool.table[req.row, : len(slots)] = slots
            if not req.output_ids:  # first admission (not a re-admission after retraction)
                req.cached_tokens = len(slots)
                self.stats.prompt_tokens += len(req.prompt_ids)
                self.stats.cached_tokens += len(slots)
            self.running.append(req)
            future += self._future_need(req)
            self._extend(batch, req, n)
            budget -= n

    def _future_need(self, req: Req) -> int:
        left = max(req.params.max_new_tokens - len(req.output_ids) - 1, 0)
        return math.ceil(left * self.new_token_ratio)

    def _make_room(self, n: int) -> bool:
        short = n - self.kv_pool.available()
        if short > 0:
            self.tree.evict(short)
        return self.kv_pool.available() >= n

    def _alloc(self, req: Req, n: int) -> None:
        slots = self.kv_pool.alloc(n)
        assert slots is not None, "room was made before allocating"
        self.req_pool.table[req.row, req.kv_len : req.kv_len + n] = slots
        req.kv_len += n

    def _retract_one(self) -> Req:
        """Send the running request with the lowest priority and then the least progress (newest
        among equals) back to waiting."""
        if not self.running:
            raise RuntimeError("KV pool exhausted with nothing to retract")  # check() prevents this
        victim = min(reversed(self.running), key=lambda r: (self.static_priority(r), len(r.output_ids)))
        self._retract(victim)
        return victim

    def _retract(self, victim: Req) -> None:
        self._free_kv(victim)
        victim.status = Status.WAITING
        self.running.remove(victim)
        self.waiting.appendleft(victim)
        self.new_token_ratio = self.cfg.init_new_token_ratio
        self.stats.retractions += 1

    # ---- results -----------------------------------------------------------------------------
    def process(self, batch: ScheduleBatch, next_ids: list[int | None], logprobs=None, top_logprobs=None) -> list[StepOutput]:
        """Apply one step's sampled tokens (None for rows that did not sample); share prefilled KV
        through the tree; free finished requests."""
        outs = []
        for i, req in enumerate(batch.reqs):
            if req.finished:  # aborted while the step ran
                continue
            if req.params.max_new_tokens == 0:  # prefill-only: done once the prompt is in the pool
                if req.pending_len == 0:
                    req.finish({"type": "length", "length": 0})
                    self._release(req)
                    outs.append(StepOutput(req, [], True))
                elif batch.extend_lens[i] > 1:
                    self._share(req)
                continue
            tok = next_ids[i]
            if tok is not None:
                outs.append(self._append_token(req, tok, logprobs, top_logprobs, i))
            if not req.finished and batch.extend_lens[i] > 1:
                self._share(req)
        return outs

    def _append_token(self, req: Req, tok: int, logprobs, top_logprobs, i) -> StepOutput:
        if logprobs is not None and logprobs[i] is not None:
            req.output_logprobs.append((logprobs[i], tok))
            req.output_top_logprobs.append(top_logprobs[i] or [])
        if self.outputs.process(req, [tok]):
            self._release(req)
        return StepOutput(req, [tok], req.finished)

    def _share(self, req: Req) -> None:
        """Put a running request's prefilled KV into the tree so others can match it now."""
        slots = self.req_pool.table[req.row, : req.kv_len]
        new_slots, node = self.tree.cache_unfinished(req.all_ids[: req.kv_len], slots.clone(),
                                                      req.protected_len, req.last_node)
        if not self.tree.disable:
            self.req_pool.table[req.row, : req.kv_len] = new_slots
            req.last_node, req.protected_len = node, req.kv_len

    def _free_kv(self, req: Req) -> None:
        """Hand a request's KV to the tree (or free it) and give back its table row."""
        if req.row is None:
            return
        slots = self.req_pool.table[req.row, : req.kv_len].clone()
        self.tree.cache_finished(req.all_ids[: req.kv_len], slots, req.protected_len, req.last_node)
        self.req_pool.free(req.row)
        req.row, req.kv_len, req.protected_len, req.last_node = None, 0, 0, None

    def _release(self, req: Req) -> None:
        self._free_kv(req)
        req.status = Status.FINISHED
        self.stats.finished_requests += 1
        if req in self.running:
            self.running.remove(req)
