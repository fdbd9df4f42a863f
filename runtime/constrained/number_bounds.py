"""Bounded JSON numbers: a schema's unbounded integer or number lets a greedy model write digits
until max_tokens ("10000000..."), the number twin of a whitespace loop. Both backends get the
same narrowing, which keeps every output valid: at most 15 integer digits (all a double holds
exactly), 15 fraction digits and a 3-digit exponent."""

from __future__ import annotations

import copy

from outlines_core.json_schema import INTEGER, NUMBER

DIGITS = 15
LIMIT = 10**DIGITS - 1
_BOUNDED_INTEGER = rf"(-)?(0|[1-9][0-9]{{0,{DIGITS - 1}}})"
_BOUNDED_NUMBER = rf"({_BOUNDED_INTEGER})(\.[0-9]{{1,{DIGITS}}})?([eE][+-][0-9]{{1,3}})?"
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const")


def bound_regex(regex: str) -> str:
    """outlines-core writes numbers as fixed fragments; swap them for bounded ones."""
    return regex.replace(NUMBER, _BOUNDED_NUMBER).replace(INTEGER, _BOUNDED_INTEGER)


def bound_schema(schema):
    """xgrammar enforces minimum/maximum: give unbounded integers and numbers +-(10^15 - 1)."""
    schema = copy.deepcopy(schema)
    _walk(schema)
    return schema


def _walk(node) -> None:
    if isinstance(node, list):
        for sub in node:
            _walk(sub)
        return
    if not isinstance(node, dict):
        return
    types = node.get("type")
    types = types if isinstance(types, list) else [types]
    if ("integer" in types or "number" in types) and not any(k in node for k in _BOUNDS):
        node["minimum"], node["maximum"] = -LIMIT, LIMIT
    elif "integer" in types or "number" in types:
        if not any(k in node for k in ("minimum", "exclusiveMinimum", "enum", "const")):
            node["minimum"] = -LIMIT
        if not any(k in node for k in ("maximum", "exclusiveMaximum", "enum", "const")):
            node["maximum"] = LIMIT
    for key, sub in node.items():
        if key not in ("enum", "const", "default", "examples"):
            _walk(sub)
