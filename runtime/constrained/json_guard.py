"""Run-time bounds on JSON output that a model could extend until max_tokens.

A small model loops inside free text: a string that repeats itself ("email_address.email_address
...", "1234567890123...") or a recursive schema nested level after level ({"next": {"next": ...).
Like a whitespace loop, such an output runs to max_tokens and is cut, invalid. The guard follows
the JSON lexically as tokens are accepted (inside a string or not, how deep) and narrows the
grammar's mask:

- once a string holds `max_string` characters, or its end repeats one short unit over and over
  (`looping`), to the allowed tokens that close it; where the
  grammar does not allow the quote yet (a format: an email needs its "@domain"), to the first
  token of the shortest string of one-character tokens after which it does (a small search);
- once `max_depth` objects/arrays are open, to the allowed tokens that open no other.

- once few tokens are left before max_new_tokens (`closing_margin`: a reserve plus a few per open
  container), to the tokens that close: a string's closing quote (alone or followed by `}`/`]`,
  never by `,`, which would only start the next item), then, outside strings, tokens that open
  nothing and, where the grammar allows one, a `}` or `]` (with no quote or comma, which would
  open a string or the next item). So a document ends complete
  within its budget wherever the schema lets it (required properties still have to be written).

If the grammar allows none of those (a minLength not met yet, a schema that requires deeper
nesting) the mask stays as the grammar made it. So the guard never lets through what the
grammar forbids, every output stays valid, and an output that keeps within the bounds is exactly
what it would have been without the guard. Bounding the schema instead (a maxLength on every
string) would do the same at compile time, but xgrammar takes seconds to compile a 256-character
repetition for each string.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from arborlm.runtime.constrained.base import Matcher, bitmask_words

JSON_KINDS = ("json_schema", "json_object")  # the grammar kinds whose output is JSON
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN, _CLOSE = frozenset(b"{["), frozenset(b"}]")
_NEXT = frozenset(b'",')  # a quote opens a string, a comma the next item: neither ends anything
_CLOSING_TAIL = frozenset(b"}] \t\r\n")  # what may follow a string's closing quote in a token that ends things
# One-character tokens tried, in order, when a string must close but the grammar wants more first
# (the separators of emails, URIs, host names and dates, and one letter and digit).
_FILLERS = b"@.:/-_a0"
_SEARCH_DEPTH, _SEARCH_BUDGET = 6, 3000  # longest filler string, most tokens tried per search
# Tokens kept for closing: a reserve (the larger of a floor and a share of max_new_tokens, for the
# required properties still to write) plus some per open container.
CLOSE_RESERVE, CLOSE_SHARE, CLOSE_PER_LEVEL = 24, 8, 8


@dataclass(frozen=True)
class LexState:
    in_string: bool = False
    escaped: bool = False
    chars: int = 0  # characters of the open string so far
    depth: int = 0  # open objects and arrays
    tail: bytes = b""  # the open string's last TAIL bytes, to see it repeat itself


# A string whose last bytes are one unit of 1..MAX_PERIOD bytes over and over (at least
# LOOP_BYTES of it, and three times) is a loop ("config.json.json.json", "000000.000000.000000"):
# it is closed as if it had reached max_string.
TAIL, MAX_PERIOD, LOOP_BYTES = 64, 21, 24


def looping(tail: bytes) -> bool:
    n = len(tail)
    for p in range(1, MAX_PERIOD + 1):
        span = max(3 * p, -(-LOOP_BYTES // p) * p)
        if span > n:
            break
        if tail[-span:] == tail[-p:] * (span // p):
            return True
    return False


class JsonGuard:
    """The vocabulary's tables, built once per engine and shared by every JSON request."""

    def __init__(self, token_bytes: dict[int, bytes], vocab_size: int, max_string: int, max_depth: int):
        self.token_bytes = token_bytes
        self.max_string = max_string or float("inf")
        self.max_depth = max_depth or float("inf")
        closes = np.zeros(bitmask_words(vocab_size) * 32, dtype=bool)
        flat = np.ones_like(closes)
        ends = np.zeros_like(closes)
        final = np.zeros_like(closes)
        for tok, data in token_bytes.items():
            if tok >= len(closes):  # a tokenizer entry past the model's vocabulary
                continue
            closes[tok] = data[:1] == b'"'
            final[tok] = closes[tok] and set(data[1:]) <= _CLOSING_TAIL
            flat[tok] = not (_OPEN & set(data))
            ends[tok] = flat[tok] and bool(_CLOSE & set(data)) and not (_NEXT & set(data))
        self.closes, self.flat, self.ends, self.final = _pack(closes), _pack(flat), _pack(ends), _pack(final)
        single = {data: tok for tok, data in token_bytes.items() if len(data) == 1}
        self.quote = single.get(b'"')
        self.fillers = [single[bytes([c])] for c in _FILLERS if bytes([c]) in single]

    def matcher(self, inner: Matcher) -> "GuardedMatcher":
        return GuardedMatcher(inner, self)

    def step(self, s: LexState, data: bytes) -> LexState:
        in_string, escaped, chars, depth = s.in_string, s.escaped, s.chars, s.depth
        base, start = s.tail, 0  # the open string's bytes: base, then data[start:]
        for i, c in enumerate(data):
            if in_string:
                if escaped:
                    escaped = False
                elif c == _BACKSLASH:
                    escaped, chars = True, chars + 1
                elif c == _QUOTE:
                    in_string = False
                elif c & 0xC0 != 0x80:  # not a UTF-8 continuation byte: a new character
                    chars += 1
            elif c == _QUOTE:
                in_string, chars, base, start = True, 0, b"", i + 1
            elif c in _OPEN:
                depth += 1
            elif c in _CLOSE:
                depth -= 1
        tail = (base + data[start:])[-TAIL:] if in_string else b""
        return LexState(in_string, escaped, chars, depth, tail)


def _pack(allowed: np.ndarray) -> torch.Tensor:
    """bool[words * 32] -> int32[words], token i at bit i % 32 of word i // 32 (little-endian)."""
    return torch.from_numpy(np.packbits(allowed, bitorder="little").view("<i4").astype(np.int32))


class GuardedMatcher:
    """A grammar matcher whose mask the guard narrows; everything else is the inner matcher's."""

    def __init__(self, inner: Matcher, guard: JsonGuard):
        self.inner, self.guard = inner, guard
        self.state = LexState()
        self.history: list[LexState] = []
        self.plan: list[int] = []  # the rest of the filler path being forced, found once per string end
        self.budget: int | None = None  # tokens left before max_new_tokens (set by the sampler each step)
        self.max_new = 0  # the request's max_new_tokens (set with budget)

    def set_budget(self, max_new_tokens: int, generated: int) -> None:
        self.budget, self.max_new = max_new_tokens - generated, max_new_tokens

    def closing(self) -> bool:
        if self.budget is None:
            return False
        reserve = max(CLOSE_RESERVE, self.max_new // CLOSE_SHARE)
        return self.budget <= reserve + CLOSE_PER_LEVEL * self.state.depth

    def fill_bitmask(self, row: torch.Tensor) -> None:
        self.inner.fill_bitmask(row)
        s, g = self.state, self.guard
        closing = self.closing()
        if closing and not s.in_string:
            narrowed = row & g.flat
            if narrowed.any():
                ends = narrowed & g.ends
                row.copy_(ends if ends.any() else narrowed)
            return
        if s.in_string and not s.escaped and (s.chars >= g.max_string or closing or looping(s.tail)):
            narrowed = row & g.closes
            if closing:  # `"` or `"}`, not `",`: a closing quote that goes on to the next item undoes the point
                final = narrowed & g.final
                if final.any():
                    narrowed = final
            if not narrowed.any():
                self.plan = self.plan or self._path_to_quote() or []
                if not self.plan:
                    return
                tok = self.plan[0]
                narrowed.zero_()
                bit = 1 << (tok % 32)
                narrowed[tok // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit  # as int32
        elif not s.in_string and s.depth >= g.max_depth:
            narrowed = row & g.flat
        else:
            return
        if narrowed.any():
            row.copy_(narrowed)

    def _path_to_quote(self) -> list[int] | None:
        """The shortest run of filler tokens after which the grammar allows a closing quote
        (iterative deepening over the inner matcher, rolled back after each try)."""
        g, m = self.guard, self.inner
        if g.quote is None:
            return None
        budget = [_SEARCH_BUDGET]

        def dfs(left: int, path: list[int]) -> list[int] | None:
            if left == 0:
                budget[0] -= 1
                if m.accept(g.quote):
                    m.rollback(1)
                    return path
                return None
            for tok in g.fillers:
                if budget[0] <= 0:
                    return None
                budget[0] -= 1
                if m.accept(tok):
                    found = dfs(left - 1, path + [tok])
                    m.rollback(1)
                    if found:
                        return found
            return None

        for depth in range(1, _SEARCH_DEPTH + 1):
            found = dfs(depth, [])
            if found or budget[0] <= 0:
                return found
        return None

    def accept(self, token: int) -> bool:
        if not self.inner.accept(token):
            return False
        self.history.append(self.state)
        self.plan = self.plan[1:] if self.plan and self.plan[0] == token else []
        self.state = self.guard.step(self.state, self.guard.token_bytes.get(token, b""))
        return True

    def rollback(self, n: int) -> None:
        self.inner.rollback(n)
        self.plan = []
        if n:
            self.state = self.history[-n]
            del self.history[-n:]

    def is_terminated(self) -> bool:
        return self.inner.is_terminated()

    def jump_forward_string(self) -> str | None:
        return self.inner.jump_forward_string()
