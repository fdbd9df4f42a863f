"""Batched sampling: penalties and logit biases, grammar masks, min_new_tokens masking, greedy and temperature / top-k / top-p /
min-p sampling, and logprobs, vectorised over the rows of a step (no Python loop over the vocab).

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which samples from p and lets
a request with a seed draw its noise from its own generator, so its output does not depend on
what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from arborlm.runtime.constrained.base import apply_bitmask, bitmask_words
from arborlm.runtime.sampling.params import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs of one request (the scheduler's Req provides these)."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    return_logprob: bool = False
    top_logprobs_num: int = 0
    grammar: Any = None  # a constrained request's Matcher: it fills this row's allowed-token mask


@dataclass
class SampleOutput:
    next_ids: list[int]
    logprobs: list[float | None]  # logprob of the chosen token, for rows that asked
    top_logprobs: list[list[tuple[float, int]] | None]


class Sampler:
    def __init__(self, vocab_size: int, eos_ids: set[int], seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SampleOutput:
        raw = logits
        logits = self._apply_penalties(logits, rows)
        logits = self._mask_grammar(logits, rows)
        logits = self._mask_min_tokens(logits, rows)
        next_ids = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            next_ids[sampled] = self._sample(logits[sampled], [rows[i] for i in sampled])
        ids = next_ids.tolist()
        lp, top = self._logprobs(raw, rows, ids)
        return SampleOutput(ids, lp, top)

    def _apply_penalties(self, logits, rows):
        idx = [i for i, r in enumerate(rows) if r.params.needs_penalty]
        if not idx:
            return logits
        logits = logits.clone()
        for i in idx:  # one small vectorised update per penalised row
            p, row = rows[i].params, logits[i]
            if rows[i].output_ids and (p.frequency_penalty or p.presence_penalty):
                counts = torch.bincount(torch.tensor(rows[i].output_ids), minlength=self.vocab_size)[: self.vocab_size]
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            if p.repetition_penalty != 1:
                seen = torch.tensor(sorted(set(rows[i].prompt_ids) | set(rows[i].output_ids)), dtype=torch.long)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
                row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype)
        return logits

    def _mask_grammar(self, logits, rows):
        """Only constrained rows get a mask; each matcher writes its packed row in place."""
        idx = [i for i, r in enumerate(rows) if r.grammar is not None]
        if not idx:
            return logits
        bitmask = torch.zeros(len(idx), bitmask_words(self.vocab_size), dtype=torch.int32)
        for j, i in enumerate(idx):
            g = rows[i].grammar
            if hasattr(g, "set_budget"):  # the JSON guard steers to close as max_new_tokens nears
                g.set_budget(rows[i].params.max_new_tokens, len(rows[i].output_ids))
            g.fill_bitmask(bitmask[j])
        logits = logits.clone()
        logits[idx] = apply_bitmask(logits[idx], bitmask)
        return logits

    def _mask_min_tokens(self, logits, rows):
        idx = [i for i, r in enumerate(rows) if len(r.output_ids) < r.params.min_new_tokens]
        if not idx:
            return logits
        logits = logits.clone()
        for i in idx:
            banned = set(rows[i].params.stop_token_ids) | (set() if rows[i].params.ignore_eos else set(self.eos_ids))
            if banned:
                logits[i, sorted(banned)] = float("-inf")
        return logits

    def _sample(self, logits, rows):
        temp = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype).unsqueeze(1)
        probs = torch.softmax(logits / temp, dim=-1)
        min_p = torch.tensor([r.params.min_p for r in rows], dtype=probs.dtype).unsqueeze(1)
        if bool((min_p > 0).any()):
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        order = None
        if any(r.params.top_k > 0 or r.params.top_p < 1 for r in rows):
            probs, order = probs.sort(dim=-1, descending=True)
            k = torch.tensor([r.params.top_k if r.params.top_k > 0 else probs.shape[1] for r in rows]).unsqueeze(1)
            probs = probs.masked_fill(torch.arange(probs.shape[1]).unsqueeze(0) >= k, 0.0)
            top_p = torch.tensor([r.params.top_p for r in rows], dtype=probs.dtype).unsqueeze(1)
            cum = probs.cumsum(dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            probs = probs.masked_fill((cum - probs) > top_p * cum[:, -1:], 0.0)
        noise = torch.empty_like(probs)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            noise[shared] = torch.empty(len(shared), probs.shape[1]).exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        choice = (probs / noise).argmax(dim=-1)
        return choice if order is None else order.gather(1, choice.unsqueeze(1)).squeeze(1)

    def _logprobs(self, raw, rows, ids):
        want = [i for i, r in enumerate(rows) if r.return_logprob]
        lp: list = [None] * len(rows)
        top: list = [None] * len(rows)
        if not want:
            return lp, top
        logp = torch.log_softmax(raw[want], dim=-1)
        chosen = logp.gather(1, torch.tensor([ids[i] for i in want]).unsqueeze(1)).squeeze(1).tolist()
        kmax = max(rows[i].top_logprobs_num for i in want)
        tv = ti = None
        if kmax > 0:
            tv, ti = logp.topk(kmax, dim=-1)
            tv, ti = tv.tolist(), ti.tolist()
        for j, i in enumerate(want):
            lp[i] = chosen[j]
            k = rows[i].top_logprobs_num
            if k > 0:
                top[i] = list(zip(tv[j][:k], ti[j][:k]))
        return lp, top
