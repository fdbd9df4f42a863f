"""Run-time bounds on JSON output that a model could extend until max_tokens.

A small model loops inside free text: a string that repeats itself ("email_address.email_address
...", "1234567890123...") or a recursive schema nested level after level ({"next": {"next": ...).
Like a whitespace loop, such an output runs to max_tokens and is cut, invalid. The guard follows
the JSON lexically as tokens are accepted (inside a string or not, how deep) and narrows the
grammar's mask:

- once a string holds `max_string` characters, or its end repeats one short unit over and over
  (`looping`), to the allowed tokens that close it; where the grammar does not allow the quote yet,
  to a path there, forced token by token: the shortest completion to one of the schema's patterns
  (pattern_completion.py: "^.*\\.dbc$" wants ".dbc"), else the shortest run of one-character
  separators after which it does (a format: an email needs its "@domain"; a small search);
- once the output repeats one unit of up to MAX_ITEM bytes (digits alike), to tokens without a
  comma: the items of a looping list ["1.0", "1.0", ...] stop;
- once `max_depth` objects/arrays are open, to the allowed tokens that open no other, preferring
  one that closes;
- where the schema asks for `uniqueItems`, to tokens that do not end a string item as an earlier
  item of its array ended;
- once few tokens are left before max_new_tokens (`closing`: a reserve plus a few per open
  container, or more where a greedy close measured on the matcher takes more), to the tokens that
  close: a string's closing quote (alone or followed by `}`/`]`, never by `,`, which would only
  start the next item), then, outside strings, tokens that open nothing and, where the grammar
  allows one, a `}` or `]` (with no quote or comma, which would open a string or the next item).
  So a document ends complete within its budget wherever the schema lets it.

If the grammar allows none of those (a minLength not met yet, a schema that requires deeper
nesting) the mask stays as the grammar made it. So the guard never lets through what the
grammar forbids, every output stays valid, and an output that keeps within the bounds is exactly
what it would have been without the guard. Bounding the schema instead (a maxLength on every
string) would do the same at compile time, but xgrammar takes seconds to compile a 256-character
repetition for each string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from arborlm.runtime.constrained.base import Matcher, bitmask_words
from arborlm.runtime.constrained.pattern_completion import decode_partial, shortest_completion

JSON_KINDS = ("json_schema", "json_object")  # the grammar kinds whose output is JSON
_QUOTE, _BACKSLASH, _BRACKET = ord('"'), ord("\\"), ord("[")
_OPEN, _CLOSE = frozenset(b"{["), frozenset(b"}]")
_NEXT = frozenset(b'",')  # a quote opens a string, a comma the next item: neither ends anything
_CLOSING_TAIL = frozenset(b"}] \t\r\n")  # what may follow a string's closing quote in a token that ends things
# One-character tokens tried, in order, when a string must close but the grammar wants more first
# (the separators of emails, URIs, host names and dates, and one letter and digit).
_FILLERS = b"@.:/-_a0"
_SEARCH_DEPTH, _SEARCH_BUDGET = 6, 3000  # longest filler string, most tokens tried per search
_RETRY_CHARS = 16  # a string whose end was not found is searched again this many characters later
_MAX_PATTERNS = 64  # schema patterns tried per search
# Tokens kept for closing: a reserve (the larger of a floor and a share of max_new_tokens, for the
# required properties still to write) plus some per open container.
CLOSE_RESERVE, CLOSE_SHARE, CLOSE_PER_LEVEL = 24, 5, 8
# Where the schema needs more than that to end (required properties still to write), a greedy close
# is measured on the matcher (xgrammar's, which rolls back any length) from twice the reserve on,
# every ESTIMATE_EVERY tokens, and closing starts at one and a half times its length (+ the floor).
ESTIMATE_EVERY, ESTIMATE_CAP = 32, 256


@dataclass(frozen=True)
class LexState:
    in_string: bool = False
    escaped: bool = False
    chars: int = 0  # characters of the open string so far
    depth: int = 0  # open objects and arrays
    tail: bytes = b""  # the open string's bytes so far (up to MAX_TEXT), to see it repeat itself
    out: bytes = b""  # the output's last OUT_TAIL bytes, digits as 0, to see items repeat
    # per open container (outermost first): None for an object, an array's string items so far
    stack: tuple = ()


# A string whose last bytes are one unit of 1..MAX_PERIOD bytes over and over (at least
# LOOP_BYTES of it, and three times) is a loop ("config.json.json.json", "000000.000000.000000"):
# it is closed as if it had reached max_string.
TAIL, MAX_PERIOD, LOOP_BYTES = 64, 21, 24
# The output repeating one unit of up to MAX_ITEM bytes (three times, and at least ITEM_BYTES of
# it; digits count as one, so {"id": 7, ...}, {"id": 8, ...} repeat too) is a list of items looping
# ["1.0.0", "1.0.0", ...]: no further item may start (tokens with a comma are masked).
OUT_TAIL, MAX_ITEM, ITEM_BYTES = 384, 128, 48
MAX_TEXT = 4096  # bytes of an open string kept for completing its pattern
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")


def looping(tail: bytes, max_period: int = MAX_PERIOD, least: int = LOOP_BYTES) -> bool:
    n = len(tail)
    for p in range(1, max_period + 1):
        span = max(3 * p, -(-least // p) * p)
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
        flat, no_comma = np.ones_like(closes), np.ones_like(closes)
        ends, final, progress = np.zeros_like(closes), np.zeros_like(closes), np.zeros_like(closes)
        self.length = np.zeros(len(closes), dtype=np.int32)
        self.by_bytes: dict[bytes, int] = {}
        # the bytes a token writes before a quote (none of them a quote or backslash) -> such tokens:
        # what ends a string exactly as an earlier item ended
        self.ending: dict[bytes, list[int]] = {}
        for tok, data in token_bytes.items():
            if tok >= len(closes):  # a tokenizer entry past the model's vocabulary
                continue
            chars = set(data)
            closes[tok] = data[:1] == b'"'
            final[tok] = closes[tok] and set(data[1:]) <= _CLOSING_TAIL
            flat[tok] = not (_OPEN & chars)
            ends[tok] = flat[tok] and bool(_CLOSE & chars) and not (_NEXT & chars)
            no_comma[tok] = b"," not in data
            # for the closing estimate: each token's length, and the tokens that move a document on
            # (a comma or quote: the next item or key) rather than lengthen a number or a name
            self.length[tok] = len(data)
            progress[tok] = bool(_NEXT & chars)
            self.by_bytes[data] = tok
            at = data.find(b'"')
            if at >= 0 and b"\\" not in data[:at]:
                self.ending.setdefault(data[:at], []).append(tok)
        self.closes, self.flat, self.ends, self.final = _pack(closes), _pack(flat), _pack(ends), _pack(final)
        self.no_comma, self.progress = _pack(no_comma), _pack(progress)
        single = {data: tok for tok, data in token_bytes.items() if len(data) == 1}
        self.single = single
        self.quote = single.get(b'"')
        self.fillers = [single[bytes([c])] for c in _FILLERS if bytes([c]) in single]

    def matcher(self, inner: Matcher, patterns: tuple[str, ...] = (), unique_items: bool = False) -> "GuardedMatcher":
        """`patterns`: the schema's string patterns, to complete a string that must close;
        `unique_items`: the schema asks for unique items somewhere, so no string item of any
        array may repeat an earlier one (the grammar cannot say so)."""
        return GuardedMatcher(inner, self, patterns, unique_items)

    def step(self, s: LexState, data: bytes) -> LexState:
        in_string, escaped, chars, depth, stack = s.in_string, s.escaped, s.chars, s.depth, s.stack
        base, start = s.tail, 0  # the open string's bytes: base, then data[start:]
        for i, c in enumerate(data):
            if in_string:
                if escaped:
                    escaped = False
                elif c == _BACKSLASH:
                    escaped, chars = True, chars + 1
                elif c == _QUOTE:
                    in_string = False
                    if stack and stack[-1] is not None:  # an array's item
                        stack = stack[:-1] + (stack[-1] | {base + data[start:i]},)
                elif c & 0xC0 != 0x80:  # not a UTF-8 continuation byte: a new character
                    chars += 1
            elif c == _QUOTE:
                in_string, chars, base, start = True, 0, b"", i + 1
            elif c in _OPEN:
                depth += 1
                stack = stack + (frozenset() if c == _BRACKET else None,)
            elif c in _CLOSE:
                depth -= 1
                stack = stack[:-1]
        tail = (base + data[start:])[:MAX_TEXT] if in_string else b""
        out = (s.out + data.translate(_DIGITS_AS_ZERO))[-OUT_TAIL:]
        return LexState(in_string, escaped, chars, depth, tail, out, stack)


def _bit(tok: int) -> int:
    """Token tok's bit in its int32 bitmask word."""
    bit = 1 << (tok % 32)
    return bit - (1 << 32) if bit >= 1 << 31 else bit


def _narrow(row: torch.Tensor, keep: torch.Tensor) -> None:
    narrowed = row & keep
    if narrowed.any():
        row.copy_(narrowed)


def _pack(allowed: np.ndarray) -> torch.Tensor:
    """bool[words * 32] -> int32[words], token i at bit i % 32 of word i // 32 (little-endian)."""
    return torch.from_numpy(np.packbits(allowed, bitorder="little").view("<i4").astype(np.int32))


class GuardedMatcher:
    """A grammar matcher whose mask the guard narrows; everything else is the inner matcher's."""

    bounds = True  # the loop, length and depth bounds apply (the tag guard keeps only the budget's close)

    def __init__(self, inner: Matcher, guard: JsonGuard, patterns: tuple[str, ...] = (), unique_items: bool = False):
        self.inner, self.guard, self.patterns, self.unique_items = inner, guard, patterns, unique_items
        self.no_path_before = 0  # a failed search for a string's end is tried again at this many chars
        self.state = LexState()
        self.history: list[LexState] = []
        self.plan: list[int] = []  # the rest of the filler path being forced, found once per string end
        self.budget: int | None = None  # tokens left before max_new_tokens (set by the sampler each step)
        self.max_new = 0  # the request's max_new_tokens (set with budget)
        self.estimate = 0  # tokens a greedy close took when last measured (_closing_cost)
        self.estimated_at: int | None = None  # the budget it was measured at

    def set_budget(self, max_new_tokens: int, generated: int) -> None:
        self.budget, self.max_new = max_new_tokens - generated, max_new_tokens

    def closing(self) -> bool:
        if self.budget is None:
            return False
        reserve = max(CLOSE_RESERVE, self.max_new // CLOSE_SHARE)
        if self.budget <= 2 * reserve and hasattr(self.inner, "can_end") and not self.plan and (
                self.estimated_at is None or self.estimated_at - self.budget >= ESTIMATE_EVERY):
            self.estimate, self.estimated_at = self._closing_cost(), self.budget
        reserve = max(reserve + CLOSE_PER_LEVEL * self.state.depth, self.estimate + self.estimate // 2 + CLOSE_RESERVE)
        return self.budget <= reserve

    def _closing_cost(self) -> int:
        """Tokens to a complete document if from here on each step took the allowed token the
        closing mask prefers (an end, else a comma or quote, else the longest), measured on the
        matcher and rolled back; ESTIMATE_CAP if it does not end by then. The real close is the
        model's and longer, so closing() keeps a margin over this."""
        m, g, state, n = self.inner, self.guard, self.state, 0
        row = torch.zeros_like(g.closes)
        while n < ESTIMATE_CAP and not m.can_end():
            row.zero_()
            m.fill_bitmask(row)
            if state.in_string:
                picks = (row & g.final, row & g.closes, row)
            else:
                flat = row & g.flat
                picks = (flat & g.ends, flat & g.progress, row & g.progress, flat, row)
            pick = next((p for p in picks if p.any()), None)
            if pick is None:
                break
            allowed = np.flatnonzero(np.unpackbits(pick.numpy().view(np.uint8), bitorder="little"))
            tok = int(allowed[np.argmax(g.length[allowed])])
            if not m.accept(tok):
                break
            n += 1
            state = g.step(state, g.token_bytes.get(tok, b""))
        ended = m.can_end()
        m.rollback(n)
        return n if ended else ESTIMATE_CAP

    def fill_bitmask(self, row: torch.Tensor) -> None:
        self.inner.fill_bitmask(row)
        self.narrow(row)

    def narrow(self, row: torch.Tensor) -> None:
        """Narrow the grammar's mask in `row` as the module docstring says."""
        s, g = self.state, self.guard
        if self.bounds and looping(s.out, MAX_ITEM, ITEM_BYTES):  # items repeating: no next one
            _narrow(row, g.no_comma)
        if self.unique_items and s.in_string and not s.escaped and s.stack and s.stack[-1]:
            self._ban_repeat(row, s.tail, s.stack[-1])
        closing = self.closing()
        if not s.in_string and (closing or self.bounds and s.depth >= g.max_depth):
            # open nothing; where the grammar allows, close (too deep: the object or array ends here
            # rather than at a value the grammar requires to be one more object)
            narrowed = row & g.flat
            if narrowed.any():
                ends = narrowed & g.ends
                row.copy_(ends if ends.any() else narrowed)
            return
        bounded = self.bounds and (s.chars >= g.max_string or looping(s.tail[-TAIL:]))
        if s.in_string and not s.escaped and (self.plan or closing or bounded):
            # (a path to the quote once begun is kept to: its first characters end the loop it was for)
            narrowed = row & g.closes
            if closing:  # `"` or `"}`, not `",`: a closing quote that goes on to the next item undoes the point
                final = narrowed & g.final
                if final.any():
                    narrowed = final
            if not narrowed.any():
                if not self.plan and s.chars >= self.no_path_before:
                    self.plan = self._path_to_quote() or []
                    self.no_path_before = 0 if self.plan else s.chars + _RETRY_CHARS
                if not self.plan:
                    return
                tok = self.plan[0]
                narrowed.zero_()
                narrowed[tok // 32] = _bit(tok)
            row.copy_(narrowed)

    def _ban_repeat(self, row: torch.Tensor, text: bytes, items: frozenset) -> None:
        """Mask the tokens that would end this string as one of the array's earlier items, and
        the token that would write the rest of one where the grammar then lets the string only
        end (a one-character pattern: "C" cannot go on to "Cat")."""
        g, keep = self.guard, row.clone()
        for item in items:
            if item.startswith(text):
                rest = item[len(text):]
                banned = list(g.ending.get(rest, ()))
                tok = g.by_bytes.get(rest) if rest else None
                if tok is not None and self._only_ends_after(tok):
                    banned.append(tok)
                for tok in banned:
                    keep[tok // 32] &= ~_bit(tok)
        if keep.any():
            row.copy_(keep)

    def _only_ends_after(self, tok: int) -> bool:
        m, g = self.inner, self.guard
        if not m.accept(tok):
            return False
        after = torch.zeros_like(g.closes)
        m.fill_bitmask(after)
        m.rollback(1)
        return not (after & ~g.closes).any()

    def _path_to_quote(self) -> list[int] | None:
        """The tokens that close the string: a completion to one of the schema's patterns, else the
        shortest run of filler tokens after which the grammar allows a closing quote (iterative
        deepening over the inner matcher, rolled back after each try); the quote comes last."""
        g, m = self.guard, self.inner
        if g.quote is None:
            return None
        found = self._pattern_path()
        if found:
            return found
        budget = [_SEARCH_BUDGET]

        def dfs(left: int, path: list[int]) -> list[int] | None:
            if left == 0:
                budget[0] -= 1
                if m.accept(g.quote):
                    m.rollback(1)
                    return path + [g.quote]
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

    def _pattern_path(self) -> list[int] | None:
        """The first of the schema's patterns whose shortest completion of the string so far the
        grammar takes, closing quote included (one-character tokens, tried and rolled back)."""
        g, m = self.guard, self.inner
        text = decode_partial(self.state.tail)
        if text is None:
            return None
        for pattern in self.patterns[:_MAX_PATTERNS]:
            rest = shortest_completion(pattern, text)
            if not rest:
                continue
            path = [g.single.get(c.encode()) for c in rest]
            if None in path:
                continue
            taken = 0
            for tok in path + [g.quote]:
                if not m.accept(tok):
                    break
                taken += 1
            m.rollback(taken)
            if taken == len(path) + 1:
                return path + [g.quote]
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


@lru_cache(maxsize=256)
def wants_unique_items(schema_text: str) -> bool:
    return re.search(r'"uniqueItems"\s*:\s*true', schema_text) is not None
