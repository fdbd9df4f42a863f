"""The checks every generation request passes before it is queued, in one place for every front:
the in-process Engine and the server's tokenizer manager call `check_prompt` (so a bad request is
a 400 / BadRequestError before anything is queued), and the scheduler keeps `check_fits` as its
own invariant (nothing it admits can outgrow the context or the KV pool)."""

from __future__ import annotations

from dataclasses import dataclass

from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.sampling.params import SamplingParams


@dataclass(frozen=True)
class Limits:
    """The engine's fixed limits (known once the model is loaded)."""

    vocab_size: int
    context_length: int
    pool_size: int  # KV slots


def check_prompt(ids: list, params: SamplingParams, limits: Limits, field: str = "input_ids") -> None:
    """A prompt's token ids and its sampling parameters against the limits; `field` names the
    request field the ids came from in the error."""
    if not ids:
        raise BadRequestError(f"{field}: the prompt is empty")
    vocab = limits.vocab_size
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise BadRequestError(f"{field}: token ids must be ints in [0, {vocab})")
    params.check_vocab(vocab)
    check_fits(len(ids), params.max_new_tokens, limits.context_length, limits.pool_size, field)


def check_fits(n_prompt: int, max_new_tokens: int, context_length: int, pool_size: int, field: str = "prompt") -> None:
    if n_prompt == 0:
        raise BadRequestError(f"{field}: the prompt is empty")
    if n_prompt + max_new_tokens > context_length:
        raise BadRequestError(f"{field}: prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                              f"the context length ({context_length})")
    need = n_prompt + max(max_new_tokens - 1, 0)  # the last sampled token is never fed back
    if need > pool_size:
        raise BadRequestError(f"{field}: prompt + max_new_tokens needs {need} KV slots; the pool holds {pool_size}")


def check_logprob_options(logprob_start_len, top_logprobs_num, vocab_size: int) -> None:
    if isinstance(logprob_start_len, bool) or not isinstance(logprob_start_len, int) or logprob_start_len < -1:
        raise BadRequestError(f"logprob_start_len: must be an int >= -1, got {logprob_start_len!r}")
    if (isinstance(top_logprobs_num, bool) or not isinstance(top_logprobs_num, int)
            or not 0 <= top_logprobs_num <= vocab_size):
        raise BadRequestError(f"top_logprobs_num: must be an int in [0, {vocab_size}], got {top_logprobs_num!r}")


def sample_params(params: SamplingParams, j: int) -> SamplingParams:
    """The parameters of sample j of a request with n > 1: n = 1, and its own seed (seed + j)."""
    import dataclasses

    return dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + j)
