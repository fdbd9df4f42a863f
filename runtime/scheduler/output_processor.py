"""What a sampled token does to its request: the stop token, stop strings and regexes, the length
limit, grammar acceptance and termination, jump-forward. Pure Python over a `Req` (its params,
detokenizer and grammar matcher): the scheduler calls `process` and only frees what finished."""

from __future__ import annotations

from typing import TYPE_CHECKING

from arborlm.runtime.scheduler.req import Req
from arborlm.runtime.scheduler.stop_text import find_stop, has_text_stops

if TYPE_CHECKING:
    from arborlm.runtime.scheduler.scheduler import SchedulerConfig


class OutputProcessor:
    def __init__(self, cfg: "SchedulerConfig"):
        self.cfg = cfg  # eos_ids, and jump_forward (read each time: it may be switched on an idle engine)

    def process(self, req: Req, new_ids: list[int]) -> bool:
        """Append `new_ids` (sampled tokens, usually one) to `req`; True once it finished."""
        for tok in new_ids:
            if req.finished:
                break
            self._append(req, tok)
        return req.finished

    def _append(self, req: Req, tok: int) -> None:
        p = req.params
        req.output_ids.append(tok)
        grammar_ok = req.grammar is None or req.grammar.accept(tok)
        may_stop = len(req.output_ids) >= p.min_new_tokens
        stop_token = may_stop and (tok in p.stop_token_ids or (not p.ignore_eos and tok in self.cfg.eos_ids))
        if req.detok is not None and (not stop_token or p.no_stop_trim):
            req.detok.add([tok])
        if stop_token:
            req.finish({"type": "stop", "matched": tok})
        elif not (may_stop and self._stop_text(req)) and len(req.output_ids) >= p.max_new_tokens:
            req.finish({"type": "length", "length": p.max_new_tokens})
        if not req.finished and req.grammar is not None:
            self._grammar_step(req, grammar_ok)
        if req.finished and req.detok is not None and req.finish_reason["type"] == "length":
            req.detok.flush()
        if req.finished and req.grammar is not None and hasattr(req.grammar, "finish_note"):
            note = req.grammar.finish_note()  # what a guard did to the output (constrained/tag_guard.py)
            if note:
                req.finish_reason = {**req.finish_reason, **note}

    def _grammar_step(self, req: Req, accepted: bool) -> None:
        """Finish a constrained request once its grammar is complete, else try a jump-forward."""
        if not accepted:  # only when other masks left the grammar no token (e.g. min_new_tokens vs EOS)
            req.finish({"type": "abort", "message": "the sampled token violates the grammar"})
        elif req.grammar.is_terminated():
            req.finish({"type": "stop", "matched": None})
        elif self.cfg.jump_forward is not None and self.cfg.jump_forward(req):
            if self._stop_text(req):
                return
            if req.grammar.is_terminated():
                req.finish({"type": "stop", "matched": None})
            elif len(req.output_ids) >= req.params.max_new_tokens:
                req.finish({"type": "length", "length": req.params.max_new_tokens})

    @staticmethod
    def _stop_text(req: Req) -> bool:
        """Finish at the first stop string / regex match in the text (trimmed off unless
        no_stop_trim); False when the request has none or none matched."""
        if req.detok is None or not has_text_stops(req.params):
            return False
        hit = find_stop(req.detok.text, req.params, req.detok.last_delta_len)
        if hit is None:
            return False
        pos, matched = hit
        if not req.params.no_stop_trim:
            req.detok.text = req.detok.text[:pos]
        req.finish({"type": "stop", "matched": matched})
        return True
