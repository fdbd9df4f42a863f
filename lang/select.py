"""`select`: score every choice with one batched prefill-only request whose shared prefix is a
cache hit, then let the choices method decide.

The prefix and each prefix+choice are tokenised: BPE may merge the prefix's last token with the
choice's first, so each choice is scored from the first token where it differs from the prefix."""

from __future__ import annotations

import math
import random

from arborlm.lang.backend.base import Backend, BackendError, GenerateCall
from arborlm.lang.choices import ChoicesDecision, ChoicesSamplingMethod


def _common_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _logprobs(result: dict, skip: int) -> list[float]:
    return [lp for lp, _, _ in result["meta_info"]["input_token_logprobs"][skip:] if lp is not None]


async def score_choices(backend: Backend, prefix: str, choices: list[str], method: ChoicesSamplingMethod,
                        temperature: float = 0.0, chat: dict | None = None) -> ChoicesDecision:
    """`chat` (the program's turns, see GenerateCall) lets a chat-completions backend score the
    choices inside the open assistant turn instead (`score_chat_choices`)."""
    chat_scores = getattr(backend, "score_chat_choices", None)
    if chat is not None and chat_scores is not None and backend.chat_mode(chat.get("assistant_prefix")):
        if method.requires_unconditional_logprobs:
            raise BackendError("unconditional_likelihood_normalized is not available through chat completions")
        decision = method(choices, await chat_scores(chat["messages"], chat["assistant_prefix"], choices))
        if temperature > 0:
            decision.decision = _sample(choices, decision.meta_info["scores"], temperature)
        return decision
    ids = await backend.tokenize([prefix] + [prefix + c for c in choices])
    prefix_ids, full = ids[0], ids[1:]
    starts = [_common_len(prefix_ids, f) for f in full]
    start = min(min(starts), len(prefix_ids))
    if start > 0:
        await backend.generate(GenerateCall.prefill(input_ids=prefix_ids[:start]))
    out = await backend.generate(GenerateCall(input_ids=full, sampling_params={"max_new_tokens": 0},
                                              return_logprob=True, logprob_start_len=start))
    token_lps = [_logprobs(r, s - start) for r, s in zip(out, starts)]
    unconditional = None
    if method.requires_unconditional_logprobs:
        unconditional = await _unconditional(backend, [f[s:] for f, s in zip(full, starts)])
    decision = method(choices, token_lps, unconditional)
    if temperature > 0:
        decision.decision = _sample(choices, decision.meta_info["scores"], temperature)
    return decision


async def _unconditional(backend: Backend, choice_ids: list[list[int]]) -> list[list[float]]:
    """Each choice's token logprobs after only the start-of-text token (no question, no context)."""
    info = await backend.model_info()
    anchor = (await backend.tokenize([info.bos_token or info.eos_token or "\n"]))[0]
    out = await backend.generate(GenerateCall(input_ids=[anchor + c for c in choice_ids],
                                              sampling_params={"max_new_tokens": 0},
                                              return_logprob=True, logprob_start_len=len(anchor)))
    return [_logprobs(r, 0) for r in out]


def _sample(choices: list[str], scores: list[float], temperature: float) -> str:
    top = max(scores)
    weights = [math.exp((s - top) / temperature) for s in scores]
    return random.choices(choices, weights)[0]
