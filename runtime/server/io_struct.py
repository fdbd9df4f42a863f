"""Every message that crosses a process boundary (pickled over ZeroMQ).

tokenizer manager --GenerateReq/AbortReq/FlushCacheReq/StatsReq--> scheduler
scheduler --BatchTokenOut (and replies)--> detokenizer --BatchStrOut (and replies)--> tokenizer manager
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from arborlm.runtime.sampling.params import SamplingParams


@dataclass
class GenerateReq:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False  # streamed requests report every --stream-interval tokens, others at the end
    priority: int = 0
    timeout: float | None = None  # seconds; None: the sampling params' own timeout, if any


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    reply_id: str


@dataclass
class StatsReq:
    reply_id: str


@dataclass
class Reply:
    """The answer to a FlushCacheReq or StatsReq, routed back through the detokenizer."""

    reply_id: str
    value: Any


@dataclass
class TokenOut:
    """One request's news from one scheduler step: only what is new since the last TokenOut."""

    rid: str
    new_ids: list[int]
    text_ids: list[int]  # the new tokens that go into the text (a matched stop token does not)
    finished: bool = False
    finish_reason: dict | None = None
    text_len: int | None = None  # final text length when a stop string trimmed it
    safe_len: int | None = None  # a stop_regex stream: text a later match cannot take back
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    input_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    # (skip_special_tokens, spaces_between_special_tokens, chars to hold back for stop strings): first only
    detok_opts: tuple[bool, bool, int] | None = None
    error: str | None = None  # the request failed in the scheduler
    error_status: int = 500


@dataclass
class BatchTokenOut:
    items: list[TokenOut]


@dataclass
class StrOut:
    token: TokenOut
    text_delta: str


@dataclass
class BatchStrOut:
    items: list[StrOut]


@dataclass
class ReadyInfo:
    """What the scheduler process reports once its model is loaded."""

    model_dir: str
    tokenizer_dir: str
    context_length: int
    vocab_size: int
    pool_size: int
