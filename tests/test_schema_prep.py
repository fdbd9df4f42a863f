"""Real-world schemas carry annotations (titles, examples, vendor `x-*` keys, typos, unknown formats):
they are dropped before compilation instead of refused, and every json_schema response says whether
its document validates against the schema as sent."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from arborlm.runtime.constrained.base import GrammarSpec
from arborlm.runtime.constrained.factory import BACKENDS, make_backend
from arborlm.runtime.constrained.schema_prep import drop_annotations
from arborlm.runtime.constrained.validate import check_document

from test_constrained import EOS, VOCAB, closers, token_bytes, walk  # noqa: F401 - closers, token_bytes: fixtures

# keyword -> an example value, as found in real schemas (SchemaStore, Kubernetes, OpenAPI, GitHub)
ANNOTATIONS = {
    "title": "Pod", "description": "a pod", "default": {}, "examples": [{}], "example": {}, "$comment": "c",
    "deprecated": True, "readOnly": True, "writeOnly": False, "readonly": True, "$id": "https://x/y.json",
    "id": "http://x/y#", "$schema": "http://json-schema.org/draft-07/schema#", "self": {"vendor": "x"},
    "links": [], "javaType": "io.k8s.Pod", "x-kubernetes-preserve-unknown-fields": True,
    "x-kubernetes-group-version-kind": [{"group": ""}], "preferredOrder": ["a"], "propertyOrder": 1,
    "version": "1.0", "_format": "x", "pettern": "^a", "markdownDescription": "m", "defaultSnippets": [],
    "contentEncoding": "base64", "contentMediaType": "text/plain", "$anchor": "a", "additionalProperties_": 1,
}


def test_annotations_are_dropped_at_every_subschema_position_and_data_is_kept():
    leaf = {"type": "string", **ANNOTATIONS}
    schema = {**ANNOTATIONS, "type": "object",
              "properties": {"title": leaf, "id": {"type": "integer", "format": "int32", **ANNOTATIONS},
                             "when": {"type": "string", "format": "date-time"}},
              "required": ["title"], "additionalProperties": {"anyOf": [leaf, {"type": "null"}]},
              "definitions": {"x": {"items": leaf, "enum": [{"title": "kept: enum values are data"}]}},
              "default": {"title": "default values are data"}}
    out = drop_annotations(schema)
    assert out == {
        "type": "object",
        "properties": {"title": {"type": "string"}, "id": {"type": "integer"},
                       "when": {"type": "string", "format": "date-time"}},
        "required": ["title"], "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "definitions": {"x": {"items": {"type": "string"}, "enum": [{"title": "kept: enum values are data"}]}},
    }


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tokenizer):
    return make_backend(request.param, tokenizer, EOS, VOCAB)


def test_a_schema_full_of_annotations_compiles_and_walks_validly(backend, token_bytes, closers):
    schema = {"$schema": "http://json-schema.org/draft-04/schema#", "id": "urn:x", "title": "Thing",
              "type": "object", "x-vendor": {"a": 1}, "javaType": "Thing",
              "properties": {"name": {"type": "string", "maxLength": 8, "example": "bob", "propertyOrder": 1},
                             "size": {"type": "integer", "format": "int64", "description": "bytes"}},
              "required": ["name", "size"], "additionalProperties": False}
    grammar = backend.compile(GrammarSpec("json_schema", json.dumps(schema)))
    for i in range(3):
        out, done, _ = walk(grammar.matcher(), token_bytes, closers, random.Random(i))
        if done:
            jsonschema.validate(json.loads(out.decode()), schema)


def test_check_document():
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}, "required": ["n"]})
    assert check_document('{"n": 4}', schema) == {"json_schema_valid": True}
    bad = check_document('{"n": 1}', schema)
    assert bad["json_schema_valid"] is False and "3" in bad["json_schema_error"] and "$.n" in bad["json_schema_error"]
    cut = check_document('{"n": ', schema)
    assert cut["json_schema_valid"] is False and "not a complete JSON document" in cut["json_schema_error"]
    assert check_document("[1]", "$$ANY$$")["json_schema_valid"] is False
    # the draft named by $schema is the one applied: draft 4's boolean exclusiveMinimum
    d4 = json.dumps({"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer", "minimum": 3,
                     "exclusiveMinimum": True})
    assert check_document("3", d4)["json_schema_valid"] is False and check_document("4", d4)["json_schema_valid"]


def test_engine_and_openai_responses_carry_the_flag(engine):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False, "title": "annotations are fine"}
    ok = engine.generate("Paris as JSON: ", {"json_schema": schema, "max_new_tokens": 40, "temperature": 0})
    assert ok["meta_info"]["json_schema_valid"] is True, ok
    cut = engine.generate("Paris as JSON: ", {"json_schema": schema, "max_new_tokens": 2, "temperature": 0})
    assert cut["meta_info"]["finish_reason"]["type"] == "length"
    assert cut["meta_info"]["json_schema_valid"] is False and cut["meta_info"]["json_schema_error"]
    free = engine.generate("Hi", {"max_new_tokens": 2})
    assert "json_schema_valid" not in free["meta_info"]
