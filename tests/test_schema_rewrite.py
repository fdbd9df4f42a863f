"""Schemas brought within what a backend enforces: exact rewrites (oneOf -> anyOf when exclusive,
tuple items, dependencies, required names outside properties, allOf merging) checked by random walks
validated with jsonschema against the original schema; non-strict requests drop what cannot be
enforced and verify the document after, strict ones refuse it by name."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from arborlm.runtime.constrained.base import GrammarError, GrammarSpec
from arborlm.runtime.constrained.factory import BACKENDS, make_backend
from arborlm.runtime.constrained.schema_check import OUTLINES, XGRAMMAR
from arborlm.runtime.constrained.schema_rewrite import relax, rewrite
from arborlm.runtime.errors import BadRequestError

from test_constrained import EOS, VOCAB, closers, token_bytes, walk  # noqa: F401 - fixtures

REWRITTEN = {  # name -> (schema, what the rewrite must produce somewhere)
    "oneOf_by_type": ({"oneOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}, {"type": "null"}]}, "anyOf"),
    "oneOf_by_const": ({"oneOf": [{"const": "red"}, {"const": "green"}, {"enum": ["blue", "cyan"]}]}, "anyOf"),
    "oneOf_by_discriminator": ({"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
         "required": ["kind", "lives"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
         "required": ["kind", "good"], "additionalProperties": False}]}, "anyOf"),
    "tuple_items": ({"type": "array", "items": [{"type": "string", "maxLength": 4}, {"type": "integer"}]},
                    "prefixItems"),
    "required_outside_properties": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "required": ["a", "b"]}, "properties"),
    "ref_into_the_middle": ({"definitions": {"a": {"type": "object", "properties": {"b": {"type": "string", "maxLength": 4}}}},
                            "type": "object", "properties": {"x": {"$ref": "#/definitions/a/properties/b"}},
                            "required": ["x"]}, "_ref0"),
    "raw_newline_in_pattern": ({"type": "string", "pattern": "^[ab\n]{1,3}$"}, "pattern"),
    "allOf_merged": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]}, "required"),
}


def _contains_key(node, key) -> bool:
    if isinstance(node, dict):
        return key in node or any(_contains_key(v, key) for v in node.values())
    if isinstance(node, list):
        return any(_contains_key(v, key) for v in node)
    return False


def test_rewrites_are_made():
    for name, (schema, key) in REWRITTEN.items():
        assert _contains_key(rewrite(schema), key), name
    assert "oneOf" in rewrite({"oneOf": [{"type": "integer"}, {"type": "number"}]})  # 1 matches both: kept
    deps = rewrite({"type": "object", "dependencies": {"a": ["b"], "c": {"required": ["d"]}}})
    assert deps["dependentRequired"] == {"a": ["b"]} and deps["dependentSchemas"] == {"c": {"required": ["d"]}}
    assert "allOf" in rewrite({"allOf": [{"type": "string"}, {"type": "integer"}]})  # a conflict stays
    # additionalProperties reads its own object's properties only: merging would change its meaning
    assert "allOf" in rewrite({"allOf": [{"properties": {"a": {}}}], "additionalProperties": False} | {
        "allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]})


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tokenizer):
    return make_backend(request.param, tokenizer, EOS, VOCAB)


@pytest.mark.parametrize("name", sorted(REWRITTEN))
def test_rewritten_schemas_compile_strictly_and_walk_validly(backend, token_bytes, closers, name):
    schema = REWRITTEN[name][0]
    if name == "raw_newline_in_pattern" and backend.name == "outlines":
        pytest.skip("outlines matches a pattern against the raw JSON text: a newline it allows comes out unescaped")
    if name == "required_outside_properties" and backend.name == "outlines":  # the added {} is not
        with pytest.raises(GrammarError, match="empty schema"):             # enforced there: narrowed
            backend.compile(GrammarSpec("json_schema", json.dumps(schema), strict=True))
        grammar = backend.compile(GrammarSpec("json_schema", json.dumps(schema), strict=False))
    else:
        grammar = backend.compile(GrammarSpec("json_schema", json.dumps(schema), strict=True))
    checker = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)(schema)
    ended = 0
    for i in range(4):
        out, done, _ = walk(grammar.matcher(), token_bytes, closers, random.Random(f"{name}-{i}"))
        if done:
            ended += 1
            checker.validate(json.loads(out.decode()))
    assert ended


UNENFORCEABLE = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                                                  "n": {"type": "number", "multipleOf": 0.5}},
                 "required": ["tags"], "not": {"required": ["forbidden"]}}


def test_non_strict_drops_what_cannot_be_enforced_and_strict_refuses_it(backend):
    backend.compile(GrammarSpec("json_schema", json.dumps(UNENFORCEABLE), strict=False))
    with pytest.raises(GrammarError, match="not enforced by the"):
        backend.compile(GrammarSpec("json_schema", json.dumps(UNENFORCEABLE), strict=True))
    _, dropped = relax(rewrite(UNENFORCEABLE), XGRAMMAR if backend.name == "xgrammar" else OUTLINES)
    assert any(d.startswith("uniqueItems at #/properties/tags") for d in dropped) and "not at #" in dropped


def test_lookaround_patterns_are_not_enforced(backend):
    schema = {"type": "string", "pattern": "^(?!org\\.)[a-z.]+$"}
    with pytest.raises(GrammarError, match="lookaround"):
        backend.compile(GrammarSpec("json_schema", json.dumps(schema), strict=True))
    backend.compile(GrammarSpec("json_schema", json.dumps(schema), strict=False))  # generated freely, verified after


def test_engine_non_strict_is_verified_and_strict_is_a_400(engine):
    out = engine.generate("Tags as JSON: ", {"json_schema": UNENFORCEABLE, "max_new_tokens": 60, "temperature": 0})
    meta = out["meta_info"]
    assert meta["json_schema_valid"] is (meta["finish_reason"]["type"] == "stop" and "json_schema_error" not in meta)
    try:
        jsonschema.validate(json.loads(out["text"]), UNENFORCEABLE)
        assert meta["json_schema_valid"] is True
    except (ValueError, jsonschema.ValidationError):
        assert meta["json_schema_valid"] is False and meta["json_schema_error"]
    with pytest.raises(BadRequestError, match="keyword 'not' is unsupported"):
        engine.generate("Hi", {"json_schema": UNENFORCEABLE, "json_schema_strict": True, "max_new_tokens": 4})


LOOSENED = {  # non-strict: what a backend reads alone is kept as a superset, not dropped
    "siblings_of_anyOf": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
                          "anyOf": [{"properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a"]},
                                    {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "overlapping_oneOf": {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "string", "pattern": "^a+$", "maxLength": 3}]},
    "siblings_of_ref": {"$defs": {"base": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
                        "$ref": "#/$defs/base", "properties": {"y": {"type": "boolean"}}, "required": ["y"]},
    "if_then_else": {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}}, "required": ["kind"],
                     "if": {"properties": {"kind": {"const": "a"}}},
                     "then": {"properties": {"n": {"type": "integer"}}, "required": ["n"]},
                     "else": {"properties": {"s": {"type": "string", "maxLength": 4}}, "required": ["s"]}},
    "false_property": {"type": "object", "properties": {"a": {"type": "integer"}, "gone": False}, "required": ["a"],
                       "additionalProperties": False},
    "ref_to_a_oneOf_with_siblings": {"$defs": {"t": {"oneOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
        {"type": "object", "properties": {"b": {"type": "string", "maxLength": 3}}, "required": ["b"]}]}},
        "$ref": "#/$defs/t", "type": "object"},
    "recursive_ref_with_siblings": {"$defs": {"node": {"type": "object", "properties": {
        "kids": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node", "required": ["v"]}},
        "v": {"type": "integer"}}}}, "$ref": "#/$defs/node", "required": ["v"]},
}


@pytest.mark.parametrize("name", sorted(LOOSENED))
def test_loosened_schemas_keep_what_stands_beside(backend, token_bytes, closers, name):
    """The relaxed schema keeps the keywords beside anyOf / $ref / if (its walks validate against
    it, and it still requires what the original required at the top), and compiles."""
    schema = LOOSENED[name]
    support = XGRAMMAR if backend.name == "xgrammar" else OUTLINES
    relaxed, dropped = relax(rewrite(schema), support)
    assert not {"required at #", "properties at #", "anyOf at #", "oneOf at #"} & set(dropped), dropped
    if name == "recursive_ref_with_siblings" and backend.name == "outlines":
        return  # outlines cannot build a recursive schema at all (refused, test_schema_corpus)
    grammar = backend.compile(GrammarSpec("json_schema", json.dumps(schema), strict=False))
    checker = jsonschema.Draft202012Validator(relaxed)
    ended = 0
    for i in range(4):
        out, done, _ = walk(grammar.matcher(), token_bytes, closers, random.Random(f"{name}-{i}"))
        if done:
            ended += 1
            doc = json.loads(out.decode())
            checker.validate(doc)
            if isinstance(schema.get("required"), list):
                assert set(schema["required"]) <= set(doc)
    assert ended
