"""One request's state and lifecycle: WAITING -> RUNNING -> FINISHED (RUNNING -> WAITING on retract)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from arborlm.runtime.detokenizer import IncrementalDetokenizer
from arborlm.runtime.sampling.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # first prompt token with a returned logprob; -1: the last one
    seed: int | None = None  # the per-request seed (n > 1 copies get seed + i)
    stream: bool = False
    priority: int = 0  # higher goes first (the scheduler flips it under --schedule-low-priority-values-first)
    timeout: float | None = None  # seconds from arrival; past them the request is aborted with what it has

    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    row: int | None = None  # row in the request-to-token table while it holds KV
    kv_len: int = 0  # leading tokens of prompt + output whose KV is in the pool
    cached_tokens: int = 0
    protected_len: int = 0  # leading KV slots owned by the radix tree (locked at last_node)
    last_node: Any = None
    finish_reason: dict | None = None
    output_logprobs: list = field(default_factory=list)  # (logprob, token_id)
    output_top_logprobs: list = field(default_factory=list)
    input_logprobs: list = field(default_factory=list)  # (logprob or None, token_id) per prompt token
    input_top_logprobs: list = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None
    grammar: Any = None  # constrained decoding: the request's Matcher, set once its grammar compiled
    grammar_future: Any = None  # the compile in flight (a Future of the Grammar)
    created: float = field(default_factory=time.perf_counter)
    finish_time: float | None = None

    def __post_init__(self):
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.created + self.timeout

    @property
    def input_logprob_start(self) -> int | None:
        """The first prompt position whose logprob is still owed, or None when none is."""
        if not self.return_logprob:
            return None
        n = len(self.prompt_ids)
        start = n - 1 if self.logprob_start_len < 0 else min(self.logprob_start_len, n - 1)
        return None if len(self.input_logprobs) >= n - start else start + len(self.input_logprobs)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending_len(self) -> int:
        """Tokens still to be fed through the model before the next token can be sampled."""
        return self.seq_len - self.kv_len

    @property
    def max_kv(self) -> int:
        """KV slots this request can ever hold: the last sampled token is never fed back."""
        return len(self.prompt_ids) + max(self.params.max_new_tokens - 1, 0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: dict) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finish_time = time.perf_counter()
