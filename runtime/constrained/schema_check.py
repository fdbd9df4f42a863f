"""Refuse JSON Schema keywords a backend would silently ignore.

Both backends drop some keywords without a word (outlines-core: number bounds, uniqueItems,
anything beside `enum`; xgrammar: uniqueItems, `not`, `if`, multi-branch allOf, unknown formats, a length beside a format),
which yields output that fails validation. Each backend declares what it enforces; anything else
is a GrammarError naming the keyword and where it sits. outlines-core is stricter still: its
format regexes (except uuid) admit text that is invalid JSON or not of the format (a quote in an
email, Unicode digits in a date), its maxProperties overshoots, and past its recursion depth it
drops properties and leaves a dangling comma. Keywords a backend only narrows (e.g.
additionalProperties next to properties, which both generate only the listed properties for)
are allowed: narrowing keeps every output valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from arborlm.runtime.constrained.base import GrammarError

ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "$defs", "definitions",
})
COMMON = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "enum", "const", "anyOf", "allOf", "$ref", "pattern", "format", "minLength", "maxLength",
    "prefixItems",
})
# A node holding one of these is generated from it alone: only `type` and annotations may sit beside.
ALONE = ("enum", "const", "$ref", "anyOf", "allOf", "prefixItems")
LENGTH = ("minLength", "maxLength")
LOOKAROUND = re.compile(r"\(\?<?[=!]")  # (?= (?! (?<= (?<!: no regex-to-grammar compiler keeps these


@dataclass(frozen=True)
class Support:
    backend: str
    keywords: frozenset
    formats: frozenset
    pattern_with_length: bool = False
    size_with_properties: bool = False  # minProperties / maxProperties beside properties
    recursion: bool = True  # a $ref that reaches itself
    empty_schema: bool = True  # `{}`, any JSON value (outlines-core's regex for it is not grouped: it
    # splits the enclosing pattern and admits text that is not the document)


OUTLINES = Support("outlines", COMMON, frozenset({"uuid"}), recursion=False, empty_schema=False)
XGRAMMAR = Support(
    "xgrammar",
    COMMON | {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
              "minProperties", "maxProperties", "patternProperties", "propertyNames"},
    frozenset({"date-time", "date", "time", "uuid", "uri", "email", "ipv4", "ipv6", "hostname",
               "duration", "uri-reference", "uri-template", "json-pointer"}),
    size_with_properties=True,
)


def check_schema(schema, support: Support) -> None:
    _check(schema, support, "#")
    if not support.recursion:
        _check_no_cycle(schema, schema, support, [])


def _check_no_cycle(root, node, s: Support, expanding: list[str]) -> None:
    """Follow local $refs depth-first; one that is already being expanded closes a cycle."""
    if isinstance(node, list):
        for sub in node:
            _check_no_cycle(root, sub, s, expanding)
        return
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        if ref in expanding:
            _fail(s, ref, "recursive $ref")
        target = root
        for part in filter(None, ref[1:].split("/")):
            target = target.get(part) if isinstance(target, dict) else None
        _check_no_cycle(root, target, s, expanding + [ref])
    for key, sub in node.items():
        if key not in ("$defs", "definitions", "$ref", "enum", "const"):
            _check_no_cycle(root, sub, s, expanding)


def _fail(support: Support, path: str, why: str):
    raise GrammarError(f"json_schema at {path}: {why} (not enforced by the {support.backend} backend)")


def _check(node, s: Support, path: str) -> None:
    if isinstance(node, bool):
        if not node:
            _fail(s, path, "the schema `false` admits nothing")
        return
    if not isinstance(node, dict):
        raise GrammarError(f"json_schema at {path}: a schema must be an object or a boolean")
    for key in node:
        if key not in s.keywords and key not in ANNOTATIONS:
            _fail(s, path, f"keyword {key!r} is unsupported")
    if not s.empty_schema and not set(node) - ANNOTATIONS:
        _fail(s, path, "the empty schema {} (any JSON value) is unsupported")
    _check_combinations(node, s, path)
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        for name, sub in (node.get(key) or {}).items():
            _check(sub, s, f"{path}/{key}/{name}")
    for key in ("items", "additionalProperties", "propertyNames"):
        if isinstance(node.get(key), dict):
            _check(node[key], s, f"{path}/{key}")
    for key in ("anyOf", "allOf", "prefixItems"):
        for i, sub in enumerate(node.get(key) or []):
            _check(sub, s, f"{path}/{key}/{i}")


def _check_combinations(node: dict, s: Support, path: str) -> None:
    for key in ALONE:
        if key in node:
            extra = sorted(set(node) - ANNOTATIONS - {key, "type"})
            if extra:
                _fail(s, path, f"keyword {extra[0]!r} beside {key!r} would be ignored")
    if "allOf" in node and len(node["allOf"]) != 1:
        _fail(s, path, "allOf with more than one schema")
    if "items" in node and not isinstance(node["items"], dict):
        _fail(s, path, "items must be a schema object")
    if "multipleOf" in node and node.get("type") != "integer":
        _fail(s, path, "multipleOf is only enforced on integers")
    if "format" in node and node["format"] not in s.formats:
        _fail(s, path, f"format {node['format']!r} is unsupported")
    has_length = any(k in node for k in LENGTH)
    if "pattern" in node and (has_length and not s.pattern_with_length or "format" in node):
        _fail(s, path, "pattern combined with minLength/maxLength/format")
    if isinstance(node.get("pattern"), str) and LOOKAROUND.search(node["pattern"]):  # xgrammar drops it silently
        _fail(s, path, "a pattern with a lookaround assertion")
    if "format" in node and has_length:  # xgrammar too drops the length beside a format
        _fail(s, path, "format combined with minLength/maxLength")
    if "required" in node and "properties" not in node:
        _fail(s, path, "required without properties")
    if "properties" in node:
        missing = sorted(set(node.get("required", [])) - set(node["properties"]))
        if missing:
            _fail(s, path, f"required property {missing[0]!r} is not in properties")
        if not s.size_with_properties and ("minProperties" in node or "maxProperties" in node):
            _fail(s, path, "minProperties/maxProperties beside properties")
