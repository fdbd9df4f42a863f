"""Drop what a JSON Schema carries that is not validation: annotations never change which documents
are valid (JSON Schema core, "unknown keywords"), so they are removed before a backend sees the
schema instead of being refused.

Removed at every subschema position: every keyword outside VALIDATION (titles, descriptions,
examples, `x-*` extensions, `javaType`, `propertyOrder`, misspellings such as `pettern`, ...), and
a `format` that is not one of the formats the spec defines (`int32`, `byte`, ...: formats are
annotations unless asserted). Property names, enum/const values and defaults are data and are
never touched. `prepare_schema` then makes the exact rewrites and, for non-strict requests, drops
what the backend cannot enforce (schema_rewrite.py) before the check (schema_check.py).
"""

from __future__ import annotations

import copy
import json

from arborlm.runtime.constrained.schema_check import check_schema
from arborlm.runtime.constrained.schema_rewrite import hoist_refs, relax, rewrite

# Validation and structure keywords of drafts 4, 6, 7, 2019-09 and 2020-12 (and draft 4's `id`).
VALIDATION = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "format", "maxItems", "minItems", "uniqueItems", "maxContains",
    "minContains", "maxProperties", "minProperties", "required", "dependentRequired", "dependencies",
    "properties", "patternProperties", "additionalProperties", "propertyNames", "items", "prefixItems",
    "additionalItems", "contains", "unevaluatedItems", "unevaluatedProperties", "allOf", "anyOf", "oneOf",
    "not", "if", "then", "else", "dependentSchemas", "$ref", "$defs", "definitions", "$dynamicRef",
    "$recursiveRef",
})
# Identifiers ($schema, $id, draft 4's id, anchors) are dropped too: the grammar needs none of them
# (only local $refs are followed), and the document is validated against the schema as sent.
# The formats JSON Schema defines (2020-12 plus draft 4-7 spellings); any other is an annotation.
FORMATS = frozenset({
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
    "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
    "relative-json-pointer", "regex", "host-name", "ip-address", "color", "utc-millisec",
})
# keyword -> how its value holds subschemas
_ONE = ("additionalProperties", "propertyNames", "additionalItems", "contains", "unevaluatedItems",
        "unevaluatedProperties", "not", "if", "then", "else")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")


def drop_annotations(schema):
    """A copy of `schema` with its annotations removed (see the module docstring)."""
    if isinstance(schema, list):  # a draft-4 tuple `items`
        return [drop_annotations(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key not in VALIDATION:
            continue
        if key == "format" and value not in FORMATS:
            continue
        if key in _ONE or key == "items":
            out[key] = drop_annotations(value)
        elif key in _MAP and isinstance(value, dict):
            out[key] = {name: drop_annotations(sub) for name, sub in value.items()}
        elif key in _LIST and isinstance(value, list):
            out[key] = [drop_annotations(sub) for sub in value]
        elif key == "dependencies" and isinstance(value, dict):  # a list of names, or a schema
            out[key] = {name: drop_annotations(sub) if isinstance(sub, dict) else sub for name, sub in value.items()}
        else:
            out[key] = value
    return out


def prepare_schema(spec, support):
    """The schema a backend compiles for a json_schema GrammarSpec: annotations dropped, exact
    rewrites made, then (non-strict) what `support` cannot enforce dropped, and finally checked:
    whatever is left unenforceable is refused by name (GrammarError)."""
    return prepare_schema_dict(json.loads(spec.value), spec.strict, support)


def prepare_schema_dict(schema, strict: bool, support):
    """prepare_schema for a schema already parsed (a structural tag's tool parameters)."""
    schema = rewrite(drop_annotations(hoist_refs(copy.deepcopy(schema))))
    if not strict:
        schema, _ = relax(schema, support)
    check_schema(schema, support)
    return schema
