"""Jump-forward decoding: when the grammar admits exactly one continuation string, append it in
one extend instead of one decode step per token.

The forced text is tokenised together with the request's last sampled token (whose KV is not in
the pool yet, so nothing is freed), so the tokens at the seam are the tokeniser's own choice
rather than an odd split the model never saw; the grammar matcher is rolled back by that one
token and walks the new ones. The last token of that tokenisation is left to the model: it may
merge with what follows (`": "` then `1` is `":` + ` 1` in canonical BPE, not `": ` + `1`). Requests that ask for logprobs are left alone: forced tokens have
none.
"""

from __future__ import annotations

from arborlm.runtime.scheduler.req import Req


class JumpForward:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.jumps = 0  # requests jumped, and tokens they gained without a decode step
        self.tokens = 0

    def __call__(self, req: Req) -> int:
        """Apply the grammar's forced string to `req`; return how many tokens were added."""
        m, detok = req.grammar, req.detok
        room = req.params.max_new_tokens - len(req.output_ids)
        if room <= 0 or req.return_logprob or detok is None or detok.read != len(detok.ids):
            return 0
        forced = m.jump_forward_string()
        if not forced:
            return 0
        last = req.output_ids[-1]
        head = self.tokenizer.decode([last])
        new = self.tokenizer.encode(head + forced, add_special_tokens=False)[:-1][: room + 1]
        text = self.tokenizer.decode(new)
        if len(new) < 2 or not text.startswith(head) or not (head + forced).startswith(text):
            return 0  # nothing to gain, or the text does not round-trip (a split character)
        m.rollback(1)
        for i, t in enumerate(new):
            if not m.accept(t):
                m.rollback(i)
                m.accept(last)
                return 0
        req.output_ids[-1:] = new
        detok.replace_last(new, text[len(head):])
        self.jumps += 1
        self.tokens += len(new) - 1
        return len(new) - 1
