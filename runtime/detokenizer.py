"""Incremental, UTF-8-safe detokenisation: text deltas that never split a multi-byte character.

The approach of vLLM / SGLang: decode a short window of recent tokens twice (with and without the
newest ones) and emit the difference, holding it back while it ends in an incomplete character.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.kwargs = dict(
            skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=spaces_between_special_tokens
        )
        self.ids: list[int] = []
        self.surr = 0  # start of the context window
        self.read = 0  # tokens before this index are already emitted as text
        self.text = ""
        self.last_delta_len = 0

    def add(self, ids: list[int]) -> str:
        """Append tokens; return the newly complete text (possibly empty)."""
        self.ids.extend(ids)
        prev = self.tokenizer.decode(self.ids[self.surr : self.read], **self.kwargs)
        full = self.tokenizer.decode(self.ids[self.surr :], **self.kwargs)
        if full.endswith("\ufffd") or len(full) < len(prev):
            self.last_delta_len = 0
            return ""  # an incomplete UTF-8 sequence: wait for more tokens
        delta = full[len(prev) :]
        self.surr, self.read = self.read, len(self.ids)
        self.text += delta
        self.last_delta_len = len(delta)
        return delta

    def replace_last(self, ids: list[int], appended: str) -> None:
        """Jump-forward swapped the last token (fully emitted) for `ids`, whose text is the old
        token's plus `appended`; the new tokens start the next context window."""
        self.ids[-1:] = ids
        self.text += appended
        self.surr, self.read = len(self.ids) - len(ids), len(self.ids)
        self.last_delta_len = len(appended)

    def flush(self) -> str:
        """At the end of a request, emit whatever is held back (even a lone replacement char)."""
        if self.read == len(self.ids):
            return ""
        prev = self.tokenizer.decode(self.ids[self.surr : self.read], **self.kwargs)
        full = self.tokenizer.decode(self.ids[self.surr :], **self.kwargs)
        delta = full[len(prev) :]
        self.surr = self.read = len(self.ids)
        self.text += delta
        return delta
