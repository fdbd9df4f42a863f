"""The model side of serving, one step at a time: model runner, sampler, radix cache and scheduler.

The one way in for both fronts: the in-process Engine (from its loop thread) and the server's
scheduler process (from its main thread, fed over ZeroMQ) hand it the same typed messages
(server/io_struct.py): `submit(GenerateReq)` builds the request, `abort(rid)`, `flush_cache()`,
`stats()`; `step()` runs one batch. Either way every torch op runs on one thread. The fronts check
a request before sending it (request_check.py), so a bad one never reaches the queue.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Callable

from arborlm.runtime.cache.radix_cache import RadixCache
from arborlm.runtime.config import EngineArgs
from arborlm.runtime.constrained.base import GrammarSpec
from arborlm.runtime.constrained.cache import GrammarCache
from arborlm.runtime.constrained.factory import make_backend
from arborlm.runtime.constrained.json_guard import JSON_KINDS, JsonGuard, wants_unique_items
from arborlm.runtime.constrained.pattern_completion import schema_patterns
from arborlm.runtime.constrained.jump_forward import JumpForward
from arborlm.runtime.constrained.tag_guard import TagGuardedMatcher, tag_markers
from arborlm.runtime.constrained.vocab import token_bytes
from arborlm.runtime.detokenizer import IncrementalDetokenizer
from arborlm.runtime.model import loader
from arborlm.runtime.model_runner import ModelRunner
from arborlm.runtime.request_check import Limits
from arborlm.runtime.scheduler.req import Req
from arborlm.runtime.scheduler.stop_text import has_text_stops
from arborlm.runtime.server import io_struct as io
from arborlm.runtime.scheduler.scheduler import Scheduler, SchedulerConfig, StepOutput

logger = logging.getLogger(__name__)


def eos_token_ids(config, tokenizer, model_dir: str) -> set[int]:
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = getattr(config, "eos_token_id", None)
    for e in eos if isinstance(eos, list) else [eos]:
        if e is not None:
            ids.add(int(e))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class EngineCore:
    def __init__(self, args: EngineArgs, keep_text: bool = False):
        """keep_text: detokenize every request here (the Engine returns text itself); the
        scheduler process only does so for requests whose stops or grammar read the text, and
        leaves the rest to the detokenizer process."""
        self.args, self.keep_text = args, keep_text
        self.runner = ModelRunner(args)
        self.tokenizer = loader.load_tokenizer(self.runner.files.tokenizer_dir)
        self.eos_ids = eos_token_ids(self.runner.config, self.tokenizer, self.runner.files.model_dir)
        self.sampler = self.runner.make_sampler(self.eos_ids)
        tok = self.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else min(self.eos_ids)
        self.grammars = GrammarCache(make_backend(args.grammar_backend, tok, eos, self.runner.vocab_size))
        self.jump_forward = JumpForward(tok) if args.enable_jump_forward else None
        self.json_guard = None
        if args.json_max_string_length or args.json_max_depth:
            self.json_guard = JsonGuard(token_bytes(tok), self.runner.vocab_size,
                                        args.json_max_string_length, args.json_max_depth)
        self._tag_tables: JsonGuard | None = None  # the guard's vocabulary tables for structural tags
        tree = RadixCache(self.runner.kv_pool.free, disable=args.disable_radix_cache)
        self.scheduler = Scheduler(self.runner.req_pool, self.runner.kv_pool, tree, SchedulerConfig(
            context_length=self.runner.context_length, max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size, schedule_policy=args.schedule_policy,
            eos_ids=self.eos_ids, jump_forward=self.jump_forward,
            low_priority_first=args.schedule_low_priority_values_first, priority_aging_s=args.priority_aging_seconds,
        ))
        self.compiling: dict[str, Req] = {}  # constrained requests whose grammar is still compiling
        self.wake: Callable[[], None] | None = None  # called from the compile thread when one is ready
        self.limits = Limits(self.runner.vocab_size, self.runner.context_length, self.runner.kv_pool.size)

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, msg: io.GenerateReq) -> Req:
        """Build the request a message asks for and queue it (BadRequestError: a grammar known to
        be refused, or a request that cannot fit)."""
        p = msg.params
        req = Req(msg.rid, msg.input_ids, p, return_logprob=msg.return_logprob, top_logprobs_num=msg.top_logprobs_num,
                  logprob_start_len=msg.logprob_start_len, seed=p.seed, stream=msg.stream, priority=msg.priority,
                  timeout=msg.timeout if msg.timeout is not None else p.timeout)
        if self.keep_text or has_text_stops(p) or p.constrained:  # text stops and jump-forward read the text
            req.detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens, p.spaces_between_special_tokens)
        req.grammar_future = self.grammar_for(p)
        self.add_request(req)
        return req

    def flush_cache(self) -> bool:
        """Empty the prefix cache; False (and nothing done) while requests are in flight."""
        return self.scheduler.flush_cache()

    def grammar_for(self, params) -> Future | None:
        """Start (or find in the cache) the compile of a request's grammar; any thread may call
        this. A spec already known to be refused raises its GrammarError at once."""
        spec = GrammarSpec.from_params(params)
        if spec is None:
            return None
        fut = self.grammars.get(spec)
        if fut.done() and fut.exception() is not None:
            raise fut.exception()
        return fut

    def add_request(self, req: Req) -> None:
        """Queue a request; a constrained one waits here, off the scheduler, until its grammar has
        compiled, so other requests keep running meanwhile."""
        fut = req.grammar_future
        if fut is not None and not fut.done():
            self.compiling[req.rid] = req
            if self.wake is not None:
                fut.add_done_callback(lambda _: self.wake())
            return
        self._admit(req)

    def _admit(self, req: Req) -> None:
        if req.grammar_future is not None:
            req.grammar = req.grammar_future.result().matcher()  # raises the compile error
            spec = GrammarSpec.from_params(req.params)
            if self.json_guard is not None and spec.kind in JSON_KINDS:
                schema = spec.value if spec.kind == "json_schema" else ""
                req.grammar = self.json_guard.matcher(req.grammar, schema_patterns(schema) if schema else (),
                                                      wants_unique_items(schema))
            elif spec.kind == "structural_tag":
                req.grammar = self.tag_guard(req.grammar, spec.value, req.params.max_new_tokens)
        self.scheduler.add_request(req)

    def tag_guard(self, matcher, value: str, max_new_tokens: int):
        """A structural tag's matcher under the tag guard (constrained/tag_guard.py: tool calls close
        within max_new_tokens and end at a repeated call); a BadRequestError when max_new_tokens
        cannot hold the shortest output the tag requires. Always on, even with the JSON guard's
        bounds off (then only the budget and repeats are guarded)."""
        markers = tag_markers(value)
        if markers is None or not hasattr(matcher, "can_end"):
            return matcher
        if self._tag_tables is None:
            self._tag_tables = self.json_guard or JsonGuard(token_bytes(self.tokenizer), self.runner.vocab_size, 0, 0)
        guarded = TagGuardedMatcher(matcher, self._tag_tables, markers, schema_patterns(value), wants_unique_items(value))
        guarded.check_budget(max_new_tokens)
        return guarded

    def _admit_compiled(self) -> list[tuple[Req, BaseException]]:
        failed = []
        for rid, req in list(self.compiling.items()):
            if req.grammar_future.done():
                del self.compiling[rid]
                try:
                    self._admit(req)
                except Exception as e:  # noqa: BLE001 - the request's own fault (a refused grammar)
                    req.finish({"type": "abort", "message": str(e)})
                    failed.append((req, e))
        return failed

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.compiling)

    def abort(self, rid: str) -> Req | None:
        req = self.scheduler.abort(rid)
        if req is None and rid in self.compiling:
            req = self.compiling.pop(rid)
            req.finish({"type": "abort"})
        return req

    def expire(self) -> list[Req]:
        """Abort every request past its deadline (--request-timeout or its own `timeout`), wherever
        it is: compiling, waiting or running. Its KV goes back to the tree like any abort's, and
        its finish reason says why, so the caller answers with what it has."""
        now = time.perf_counter()
        late = [r for r in (*self.compiling.values(), *self.scheduler.waiting, *self.scheduler.running)
                if r.timeout is not None and now >= r.created + r.timeout]
        for req in late:
            self.abort(req.rid)
            req.finish_reason = {"type": "abort", "timeout": req.timeout,
                                 "message": f"request timed out after {req.timeout:g} s (deadline); the output is cut short"}
        return late

    def shutdown(self) -> None:
        self.grammars.shutdown()
        if self.runner.decode_graphs is not None:
            self.runner.decode_graphs.close()

    def step(self) -> tuple[list[StepOutput], list[tuple[Req, BaseException]]]:
        """Schedule and run one batch. Returns the step's outputs and the requests that failed
        (a failure aborts those requests and keeps the core serving)."""
        sched = self.scheduler
        expired = [StepOutput(req, [], True) for req in self.expire()]
        rejected = self._admit_compiled() if self.compiling else []
        try:
            batch = sched.schedule()
        except Exception as e:  # noqa: BLE001 - a scheduler bug must not hang every caller
            logger.exception("scheduling failed; aborting all requests")
            failed = list(sched.waiting) + list(sched.running)
            for req in failed:
                sched.abort(req.rid)
            return expired, rejected + [(r, e) for r in failed]
        if batch is None:
            return expired, rejected
        try:
            next_ids, so = self.runner.run(batch, self.sampler)
            outs = sched.process(batch, next_ids, so.logprobs if so else None, so.top_logprobs if so else None)
            return expired + outs, rejected
        except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
            logger.exception("forward step failed")
            for req in batch.reqs:
                if not req.finished:
                    sched.abort(req.rid)
            return expired, rejected + [(r, e) for r in batch.reqs]

    def abort_all(self) -> list[Req]:
        reqs = list(self.scheduler.waiting) + list(self.scheduler.running) + list(self.compiling.values())
        for req in reqs:
            self.abort(req.rid)
        return reqs
