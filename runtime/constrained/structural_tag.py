"""Structural tags: free text with tagged sections whose content follows a JSON Schema (tool
calls), compiled by xgrammar. Two spellings are read: xgrammar's (`{"type": "structural_tag",
"format": {...}}`) and SGLang's older one (`{"type": "structural_tag", "structures": [{"begin",
"schema", "end"}], "triggers": [...]}`, what SGLang's clients send). Every JSON Schema inside is
prepared exactly like a json_schema request's (annotations dropped, rewrites, bounded numbers).
"""

from __future__ import annotations

import json

from arborlm.runtime.constrained.base import GrammarError
from arborlm.runtime.constrained.number_bounds import bound_schema
from arborlm.runtime.constrained.schema_prep import prepare_schema_dict


def to_xgrammar(value: str, strict: bool, support) -> str:
    """The structural tag `value` (a JSON string) in xgrammar's format, its schemas prepared."""
    try:
        tag = json.loads(value)
    except ValueError as e:
        raise GrammarError(f"structural_tag: not valid JSON ({e})") from None
    if not isinstance(tag, dict):
        raise GrammarError("structural_tag: must be a JSON object")
    if "structures" in tag:  # SGLang's spelling
        structures, triggers = tag.get("structures"), tag.get("triggers")
        if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or not triggers:
            raise GrammarError("structural_tag: `structures` and `triggers` must be non-empty lists")
        tags = []
        for i, s in enumerate(structures):
            if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("begin", "end")):
                raise GrammarError(f"structural_tag.structures[{i}]: needs string `begin` and `end`")
            tags.append({"type": "tag", "begin": s["begin"], "end": s["end"],
                         "content": {"type": "json_schema", "json_schema": s.get("schema", {})}})
        tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}
    elif not isinstance(tag.get("format"), dict):
        raise GrammarError("structural_tag: needs a `format` object (xgrammar) or `structures` and `triggers` (SGLang)")
    return json.dumps(_prepare(tag, strict, support))


def _prepare(node, strict: bool, support):
    if isinstance(node, list):
        return [_prepare(v, strict, support) for v in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and isinstance(node.get("json_schema"), dict):
        schema = prepare_schema_dict(node["json_schema"], strict, support)
        return {**node, "json_schema": bound_schema(schema)}
    return {k: _prepare(v, strict, support) for k, v in node.items()}
