"""The budget and repeat guard for structural tags: tool calls close within max_tokens and a reply
that writes the same call again ends there.

A structural tag (runtime/tool_calls/request.py builds one per chat request with tools) is free
text with tagged sections, each a JSON value after its `begin` (`<tool_call>\\n{"name": "f",
"arguments": {...}}\\n</tool_call>`). Without a guard a forced call ("required", a named function)
can run to max_tokens and be cut, and a small model at temperature 0 writes the same call twice or
more, each copy a valid "parallel" call. The guard wraps the grammar's matcher like the JSON guard
(json_guard.py: its close and its uniqueItems ban, not its loop, length and depth bounds, which
would change calls that keep within the budget) and narrows its mask, never widening it, so every
output stays within the grammar:

- *Sections.* The output is split at the tag's triggers and begins: a section runs from one to the
  point where its JSON value closes; the rest (text before a call, the closing `</tool_call>`) is
  free text. Only inside a section, or where the grammar cannot end yet (before a forced call,
  inside its envelope), does the budget apply.
- *Budget.* `cost` is the length of a greedy close measured on the matcher (rolled back): each
  step the allowed token that closes a string, then one that ends an object or array, then one
  that moves on without writing string content, else the longest. It is an exact path to a
  complete output, so `slack` = tokens left - 1 (the end of sequence) - cost says how much the
  model may still write. Once slack is SOFT_MARGIN, nothing new opens outside strings and `}`/`]`
  are preferred; at STRING_MARGIN an open string closes; at HARD_MARGIN the close is forced token
  by token (where the grammar allows a few tokens, each that still fits is left to the model, so
  the model, not the guard, picks the function). Jump-forward is off there, so the path's tokens
  are exactly the ones counted. A request whose grammar cannot end without a section (a forced
  call) and whose max_new_tokens cannot hold even that path is refused up front (`check_budget`).
- *No room for another.* After a complete section, where the grammar lets the output end, it
  ends if what is left would not hold another section as long as the longest so far plus
  SOFT_MARGIN: a further call would only be cut or closed early.
- *Repeats.* A section equal to an earlier one (the same bytes once whitespace outside JSON
  strings is dropped: for a tool call, the same function with the same arguments) ends the
  output where the grammar allows. The section is still in the text; the OpenAI layer drops the
  repeat from `tool_calls` and says so (parse.distinct, which compares arguments as JSON, so it
  also drops a repeat with its keys in another order, which the guard does not stop at).

What the guard did is reported by `finish_note()`, which the output processor adds to the
request's finish reason as `"guard": [...]`: "closed" (a section was narrowed to close within the
budget, so its content may be cut short), "no_more" (the output was ended after a complete section
for lack of room), "repeat" (it was ended at a repeated section). An output that keeps within the
budget (never closer to it than SOFT_MARGIN spare tokens) and never repeats a section is what it
would have been without the guard, but for the uniqueItems ban, which only enforces the schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import torch

from arborlm.runtime.constrained.json_guard import ESTIMATE_CAP, GuardedMatcher, JsonGuard, LexState, _bit, _pack
from arborlm.runtime.errors import BadRequestError

HARD_MARGIN = 1  # slack at which the close is forced token by token
STRING_MARGIN = 3  # slack at which an open string closes
SOFT_MARGIN = 16  # slack at which nothing new opens; also the room another section needs over the longest
FIT_CHOICES = 12  # in the forced close, up to this many allowed tokens are each checked for fitting
_WHITESPACE = frozenset(b" \t\r\n")


@dataclass(frozen=True)
class Sections:
    """Where the output is relative to the tag's sections (immutable: one per accepted token, for rollback)."""

    open: bool = False  # inside a section
    free: bytes = b""  # the free text's last bytes (a marker may span tokens)
    body: bytes = b""  # the open section's bytes so far
    keys: tuple = ()  # each closed section, whitespace outside strings dropped
    ends: tuple = ()  # the token count at which each closed
    tokens: int = 0  # tokens accepted
    repeat: bool = False  # a closed section equals an earlier one


def tag_markers(value: str) -> tuple[bytes, ...] | None:
    """The texts that open a section (every trigger and tag `begin`) of the structural tag `value`,
    or None when the guard does not apply: a tag whose content is not a JSON Schema, or none."""
    try:
        tag = json.loads(value)
    except ValueError:
        return None
    markers: list[str] = []
    ok = [True]

    def walk(node) -> None:
        if isinstance(node, list):
            for v in node:
                walk(v)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if kind in ("grammar", "regex", "ebnf"):
            ok[0] = False
        if kind == "tag" or "begin" in node and "end" in node:
            if isinstance(node.get("begin"), str):
                markers.append(node["begin"])
            content = node.get("content")
            if "schema" not in node and not (isinstance(content, dict) and content.get("type") in ("json_schema", "sequence", "or")):
                ok[0] = False  # a tag with free or non-JSON content: sections cannot be followed lexically
        for t in node.get("triggers") or ():
            if isinstance(t, str):
                markers.append(t)
        for k, v in node.items():
            if k not in ("json_schema", "schema"):
                walk(v)

    walk(tag)
    found = tuple(dict.fromkeys(m.encode() for m in markers if m))
    return found if ok[0] and found else None


def _compact(body: bytes) -> bytes:
    """A section without the whitespace outside its JSON strings (how repeats are compared)."""
    out, in_string, escaped = bytearray(), False, False
    for c in body:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in _WHITESPACE:
            continue
        out.append(c)
    return bytes(out)


def _clean_table(g: JsonGuard) -> torch.Tensor:
    """Tokens that, written outside a string, put nothing inside one (`{"`, ` "`, `,`) and hold no
    minus sign: the greedy close prefers them to ones like `:",` that open a string with content,
    or ` :-` that starts a negative number. Cached on the guard."""
    cached = getattr(g, "_tag_clean", None)
    if cached is not None:
        return cached
    clean = np.zeros(len(g.closes) * 32, dtype=bool)
    for tok, data in g.token_bytes.items():
        if tok >= len(clean):
            continue
        in_string, content = False, False
        for c in data:
            if c == 0x22:
                in_string = not in_string
            elif in_string:
                content = True
                break
        clean[tok] = not content and b"-" not in data
    g._tag_clean = _pack(clean)
    return g._tag_clean


def _ones(row: torch.Tensor) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.numpy().view(np.uint8), bitorder="little"))


class TagGuardedMatcher(GuardedMatcher):
    bounds = False

    def __init__(self, inner, guard: JsonGuard, markers: tuple[bytes, ...], patterns: tuple[str, ...] = (),
                 unique_items: bool = False):
        super().__init__(inner, guard, patterns, unique_items)
        self.markers = markers
        self.keep = max(len(m) for m in markers) - 1
        self.sections = Sections()
        self.clean = _clean_table(guard)
        self.stop_mask = torch.zeros_like(guard.closes)
        for tok in getattr(inner, "stop_ids", ()):
            if tok < len(self.stop_mask) * 32:
                self.stop_mask[tok // 32] |= _bit(tok)
        self.cost: int | None = None  # the greedy close's length when last measured (None: none found)
        self.next_token: int | None = None  # its first token
        self.measured_at: int | None = None  # the budget it was measured at
        self.notes: set[str] = set()

    # ---- the budget ------------------------------------------------------------------------------
    def check_budget(self, max_new_tokens: int) -> None:
        """A 400 where the grammar needs a section before it can end (a forced tool call) and
        max_new_tokens cannot hold the shortest the guard can write, with the end of the reply."""
        if self.inner.can_end():
            return
        cost, _ = self._greedy_close()
        if cost is not None and cost + 1 > max_new_tokens:
            raise BadRequestError(
                f"max_tokens: {max_new_tokens} is too few for the output the request requires (such as a forced "
                f"tool call): the shortest takes {cost + 1} tokens with the end of the reply (max_new_tokens on /generate)")

    def slack(self) -> int | None:
        """Tokens the model may still write beyond the close (as of the last measure; None: unknown)."""
        if self.budget is None or self.cost is None:
            return None
        return self.budget - 1 - self.cost

    def _measure(self) -> None:
        b = self.budget
        if b is None:
            return
        if self.measured_at is not None:
            since = self.measured_at - b
            last = self.slack()
            every = 8 if last is None else max(1, (last - SOFT_MARGIN - 8) // 4)
            if since < every:
                return
        self.cost, self.next_token = self._greedy_close()
        self.measured_at = b

    def _greedy_close(self) -> tuple[int | None, int | None]:
        """(tokens to a complete output, the first of them) if each step took the token the
        closing masks prefer, measured on the matcher and rolled back; (None, None) if it does not
        end within ESTIMATE_CAP."""
        m, g, state, n, first = self.inner, self.guard, self.state, 0, None
        row = torch.zeros_like(g.closes)
        while not m.can_end():
            if n >= ESTIMATE_CAP:
                m.rollback(n)
                return None, None
            tok = self._greedy_token(row, state)
            if tok is None or not m.accept(tok):
                m.rollback(n)
                return None, None
            n += 1
            first = tok if first is None else first
            state = g.step(state, g.token_bytes.get(tok, b""))
        m.rollback(n)
        return n, first

    def _greedy_token(self, row: torch.Tensor, state: LexState) -> int | None:
        g = self.guard
        row.zero_()
        self.inner.fill_bitmask(row)
        if state.in_string:
            picks = (row & g.final, row & g.closes, row)
        else:
            flat, moves = row & g.flat, row & g.progress
            picks = (flat & g.ends, flat & moves & self.clean, moves & self.clean, flat & moves, moves,
                     flat & self.clean, flat, row)
        pick = next((p for p in picks if p.any()), None)
        if pick is None:
            return None
        allowed = _ones(pick)
        return int(allowed[np.argmax(g.length[allowed])])

    def closing(self) -> bool:
        slack = self.slack()
        return slack is not None and slack <= (STRING_MARGIN if self.state.in_string else SOFT_MARGIN)

    def _no_room(self) -> bool:
        ends = self.sections.ends
        longest = max(b - a for a, b in zip((0,) + ends, ends))
        return self.budget is not None and self.budget - 1 < longest + SOFT_MARGIN

    # ---- the mask --------------------------------------------------------------------------------
    def fill_bitmask(self, row: torch.Tensor) -> None:
        m, sec = self.inner, self.sections
        m.fill_bitmask(row)
        if not sec.open and m.can_end():  # free text where the output may end
            if sec.ends and (sec.repeat or self._no_room()):
                self._only_stop(row, "repeat" if sec.repeat else "no_more")
            return
        self._measure()
        slack = self.slack()
        if slack is not None and slack <= HARD_MARGIN and self.next_token is not None:
            self._force_close(row)
            return
        before = row.clone() if self.closing() else None
        self.narrow(row)
        if before is not None and sec.open and not torch.equal(before, row):
            self.notes.add("closed")

    def _force_close(self, row: torch.Tensor) -> None:
        """Keep only tokens after which the greedy close still fits: the greedy path's next token,
        or, where the grammar allows only a few tokens, each of them that fits."""
        allowed = _ones(row)
        if len(allowed) <= 1:
            return
        keep = [self.next_token]
        if len(allowed) <= FIT_CHOICES:
            room = self.budget - 2  # after this token: the close, then the end of sequence
            keep = []
            for tok in allowed.tolist():
                if self.inner.accept(tok):
                    saved = self.state
                    self.state = self.guard.step(saved, self.guard.token_bytes.get(tok, b""))
                    cost, _ = self._greedy_close()
                    self.state = saved
                    self.inner.rollback(1)
                    if cost is not None and cost <= room:
                        keep.append(tok)
            keep = keep or [self.next_token]
        narrowed = torch.zeros_like(row)
        for tok in keep:
            narrowed[tok // 32] |= _bit(tok)
        narrowed &= row
        if narrowed.any():
            if self.sections.open:
                self.notes.add("closed")
            row.copy_(narrowed)

    def _only_stop(self, row: torch.Tensor, note: str) -> None:
        narrowed = row & self.stop_mask
        if narrowed.any() and not torch.equal(narrowed, row):
            row.copy_(narrowed)
            self.notes.add(note)

    def jump_forward_string(self) -> str | None:
        slack = self.slack()
        if slack is not None and slack - 1 <= HARD_MARGIN + 1:  # the close's tokens are counted one by one
            return None
        return self.inner.jump_forward_string()

    def finish_note(self) -> dict:
        return {"guard": sorted(self.notes)} if self.notes else {}

    # ---- following the output --------------------------------------------------------------------
    def accept(self, token: int) -> bool:
        if not self.inner.accept(token):
            return False
        self.history.append((self.state, self.sections))
        self.plan = self.plan[1:] if self.plan and self.plan[0] == token else []
        sec = replace(self.sections, tokens=self.sections.tokens + 1)
        self.state, self.sections = self._feed(self.state, sec, self.guard.token_bytes.get(token, b""))
        return True

    def rollback(self, n: int) -> None:
        self.inner.rollback(n)
        self.plan = []
        if n:
            self.state, self.sections = self.history[-n]
            del self.history[-n:]

    def _feed(self, state: LexState, sec: Sections, data: bytes) -> tuple[LexState, Sections]:
        g = self.guard
        while data:
            if not sec.open:
                buf = sec.free + data
                hits = [i for i in (buf.find(mk) for mk in self.markers) if i >= 0]
                if not hits:
                    return LexState(), replace(sec, free=buf[-self.keep:] if self.keep else b"")
                at = min(hits)
                sec, state, data = replace(sec, open=True, free=b"", body=b""), LexState(), buf[at:]
                continue
            new, body = g.step(state, data), sec.body + data
            if new.in_string or new.depth > 0 or b"{" not in body:
                return new, replace(sec, body=body)
            s, cut = state, len(data)
            for i in range(len(data)):  # the byte at which the section's JSON closes
                s = g.step(s, data[i:i + 1])
                if not s.in_string and s.depth <= 0 and b"{" in sec.body + data[:i + 1]:
                    cut = i + 1
                    break
            key = _compact(sec.body + data[:cut])
            sec = replace(sec, open=False, free=b"", body=b"", keys=sec.keys + (key,), ends=sec.ends + (sec.tokens,),
                          repeat=sec.repeat or key in sec.keys)
            state, data = LexState(), data[cut:]
        return state, sec
