"""The shortest text that completes a string to a match of a JSON Schema `pattern`.

The JSON guard (json_guard.py) must close a string that loops, but where the schema gives the
string a pattern ("^.*\\.[dD][bB][cC]$", "^(.+/)+(.+)@(.+)$") the closing quote is only allowed
once the text matches. The guard sees the grammar, not the schema node, so it tries the schema's
patterns in turn: each one's character DFA (interegular) is run over the string so far and
searched breadth-first for the nearest accepting state; the grammar then checks the candidate.
"""

from __future__ import annotations

import json
from collections import deque
from functools import lru_cache

import interegular
from interegular.fsm import anything_else

MAX_COMPLETION = 48  # characters: a longer completion is not worth forcing
# Characters tried for a class, best first (any single-character token would do; these read well)
_PREFERRED = "a0e1xA_-./:@ "


@lru_cache(maxsize=512)
def _fsm(pattern: str):
    """The pattern's DFA as an ECMA search (unanchored unless it says ^ / $), or None if
    interegular cannot read it (lookarounds, backreferences, anchors inside alternations)."""
    body = pattern
    head = "" if body.startswith("^") else ".*"
    body = body[1:] if body.startswith("^") else body
    tail = ".*"
    if body.endswith("$") and not body.endswith("\\$"):
        body, tail = body[:-1], ""
    try:
        return interegular.parse_pattern(f"{head}(?:{body}){tail}").to_fsm()
    except Exception:  # noqa: BLE001 - interegular.Unsupported and its parse errors: no completion
        return None


def _char_for(fsm, cls) -> str | None:
    chars = fsm.alphabet.by_transition[cls]
    if anything_else in chars:
        return next((c for c in _PREFERRED if c not in fsm.alphabet), None)
    usable = [c for c in chars if c not in '"\\' and c.isprintable()]
    if not usable:
        return None
    return next((c for c in _PREFERRED if c in usable), min(usable, key=lambda c: (not c.islower(), c)))


def shortest_completion(pattern: str, text: str) -> str | None:
    """The shortest string s (of printable characters, no quote or backslash) such that text + s
    matches `pattern`, or None (no such s within MAX_COMPLETION, or a pattern it cannot read)."""
    fsm = _fsm(pattern)
    if fsm is None:
        return None
    state = fsm.initial
    for ch in text:
        cls = fsm.alphabet[ch] if ch in fsm.alphabet else fsm.alphabet[anything_else]
        state = fsm.map.get(state, {}).get(cls)
        if state is None:
            return None
    seen, queue = {state: ""}, deque([state])
    while queue:
        s = queue.popleft()
        if s in fsm.finals:
            return seen[s]
        if len(seen[s]) >= MAX_COMPLETION:
            continue
        for cls, nxt in fsm.map.get(s, {}).items():
            if nxt not in seen and (ch := _char_for(fsm, cls)) is not None:
                seen[nxt] = seen[s] + ch
                queue.append(nxt)
    return None


def decode_partial(raw: bytes) -> str | None:
    """The text of an open JSON string from its raw bytes (escapes read), or None mid-escape."""
    try:
        return json.loads(b'"' + raw + b'"')
    except ValueError:
        return None


@lru_cache(maxsize=256)
def schema_patterns(schema_text: str) -> tuple[str, ...]:
    """Every `pattern` string in a JSON Schema (each once, in order of appearance)."""
    try:
        schema = json.loads(schema_text)
    except ValueError:
        return ()
    found: dict[str, None] = {}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                found[node["pattern"]] = None
            for key, value in node.items():
                if key not in ("enum", "const", "default", "examples"):
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return tuple(found)
