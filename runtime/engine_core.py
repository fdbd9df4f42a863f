"""The model side of serving, one step at a time: model runner, sampler, radix cache and scheduler.

The in-process Engine drives it from its loop thread; the server's scheduler process drives it
from its own main thread. Either way every torch op runs on one thread.
"""

from __future__ import annotations

import logging

from arborlm.runtime.cache.radix_cache import RadixCache
from arborlm.runtime.config import EngineArgs
from arborlm.runtime.model import loader
from arborlm.runtime.model_runner import ModelRunner
from arborlm.runtime.scheduler.req import Req
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
    def __init__(self, args: EngineArgs):
        self.args = args
        self.runner = ModelRunner(args)
        self.tokenizer = loader.load_tokenizer(self.runner.files.tokenizer_dir)
        self.eos_ids = eos_token_ids(self.runner.config, self.tokenizer, self.runner.files.model_dir)
        self.sampler = self.runner.make_sampler(self.eos_ids)
        tree = RadixCache(self.runner.kv_pool.free, disable=args.disable_radix_cache)
        self.scheduler = Scheduler(self.runner.req_pool, self.runner.kv_pool, tree, SchedulerConfig(
            context_length=self.runner.context_length, max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size, schedule_policy=args.schedule_policy,
            eos_ids=self.eos_ids,
        ))

    def step(self) -> tuple[list[StepOutput], list[tuple[Req, BaseException]]]:
        """Schedule and run one batch. Returns the step's outputs and the requests that failed
        (a failure aborts those requests and keeps the core serving)."""
        sched = self.scheduler
        try:
            batch = sched.schedule()
        except Exception as e:  # noqa: BLE001 - a scheduler bug must not hang every caller
            logger.exception("scheduling failed; aborting all requests")
            failed = list(sched.waiting) + list(sched.running)
            for req in failed:
                sched.abort(req.rid)
            return [], [(r, e) for r in failed]
        if batch is None:
            return [], []
        try:
            next_ids, so = self.runner.run(batch, self.sampler)
            return sched.process(batch, next_ids, so.logprobs if so else None, so.top_logprobs if so else None), []
        except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
            logger.exception("forward step failed")
            for req in batch.reqs:
                if not req.finished:
                    sched.abort(req.rid)
            return [], [(r, e) for r in batch.reqs]

    def abort_all(self) -> list[Req]:
        reqs = list(self.scheduler.waiting) + list(self.scheduler.running)
        for req in reqs:
            self.scheduler.abort(req.rid)
        return reqs
