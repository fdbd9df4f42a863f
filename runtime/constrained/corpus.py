"""The structured-generation corpus: JSON schemas and regexes shared by the tests and
benchmarks/bench_structured.py (here, so neither imports the other). Each schema covers a feature
users rely on; some are outside what one backend enforces, and that backend must refuse them by
name rather than ignore them."""

from __future__ import annotations

S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(props: dict, required=None, **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **kw}


PERSON = obj({"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120}})
TREE = {
    "$defs": {"node": obj({"value": I, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
                          required=["value"])},
    "$ref": "#/$defs/node",
}

SCHEMAS: dict[str, dict] = {
    "flat_required": obj({"name": S, "age": I, "active": B}),
    "optional_fields": obj({"id": I, "nickname": S, "score": N}, required=["id"]),
    "no_required": obj({"a": I, "b": S}, required=[]),
    "nested_object": obj({"user": obj({"name": S, "email": {"type": "string", "format": "email"}}), "ok": B}),
    "deep_nesting": obj({"a": obj({"b": obj({"c": obj({"d": I})})})}),
    "array_of_strings": obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 4}}),
    "array_exact": obj({"rgb": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3}}),
    "array_of_objects": obj({"items": {"type": "array", "items": obj({"sku": S, "qty": I}), "maxItems": 3}}),
    "top_level_array": {"type": "array", "items": I, "minItems": 2, "maxItems": 5},
    "empty_array_allowed": obj({"xs": {"type": "array", "items": B, "maxItems": 2}}),
    "enum_strings": obj({"color": {"enum": ["red", "green", "blue"]}}),
    "enum_mixed": obj({"v": {"enum": ["on", 1, None, True]}}),
    "const_string": obj({"kind": {"const": "invoice"}, "n": I}),
    "const_number": obj({"version": {"const": 2}, "name": S}),
    "anyof_scalar": obj({"v": {"anyOf": [I, S]}}),
    "anyof_null": obj({"maybe": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]}}),
    "anyof_objects": obj({"shape": {"anyOf": [obj({"r": N}), obj({"w": N, "h": N})]}}),
    "type_list": obj({"x": {"type": ["integer", "null"]}}),
    "ref_defs": {"$defs": {"pt": obj({"x": I, "y": I})}, **obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
    "ref_definitions": {"definitions": {"name": {"type": "string", "maxLength": 12}}, **obj({"n": {"$ref": "#/definitions/name"}})},
    "recursive_tree": TREE,
    "recursive_list": {"$defs": {"cell": obj({"v": I, "next": {"anyOf": [{"$ref": "#/$defs/cell"}, {"type": "null"}]}})},
                       "$ref": "#/$defs/cell"},
    "string_pattern": obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    "string_pattern_code": obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),
    "string_length": obj({"s": {"type": "string", "minLength": 2, "maxLength": 8}}),
    "string_max_only": obj({"s": {"type": "string", "maxLength": 5}}),
    "format_date": obj({"d": {"type": "string", "format": "date"}}),
    "format_datetime": obj({"t": {"type": "string", "format": "date-time"}}),
    "format_uuid": obj({"id": {"type": "string", "format": "uuid"}}),
    "format_email": obj({"e": {"type": "string", "format": "email"}}),
    "format_uri": obj({"u": {"type": "string", "format": "uri"}}),
    "format_ipv4": obj({"ip": {"type": "string", "format": "ipv4"}}),
    "integer_bounds": obj({"n": {"type": "integer", "minimum": 1, "maximum": 10}}),
    "integer_exclusive": obj({"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}}),
    "number_bounds": obj({"p": {"type": "number", "minimum": 0, "maximum": 1}}),
    "integer_multiple": obj({"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}}),
    "additional_false": obj({"a": I, "b": S}, additionalProperties=False),
    "additional_false_nested": obj({"o": obj({"k": S}, additionalProperties=False)}, additionalProperties=False),
    "dict_of_ints": {"type": "object", "additionalProperties": I, "maxProperties": 3},
    "boolean_only": B,
    "null_or_int_top": {"anyOf": [I, {"type": "null"}]},
    "person_with_bounds": PERSON,
    "prefix_items": {"type": "array", "prefixItems": [S, I, B]},
    "many_fields": obj({f"f{i}": [S, I, B, N][i % 4] for i in range(12)}),
    "invoice": obj({
        "number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "status": {"enum": ["draft", "sent", "paid"]},
        "lines": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": obj({"desc": {"type": "string", "maxLength": 20}, "qty": I, "price": N})},
        "paid": B,
    }, additionalProperties=False),
    "unique_items": {"type": "array", "items": I, "uniqueItems": True},  # neither backend enforces it
    "not_keyword": {"not": {"type": "string"}},  # neither backend enforces it
}

REGEXES: dict[str, str] = {
    "phone": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}",
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
    "hex_color": r"#[0-9a-fA-F]{6}",
    "yes_no": r"(yes|no)",
    "sentence": r"[A-Z][a-z]{1,10}( [a-z]{1,10}){2,5}\.",
    "email": r"[a-z]{1,10}@[a-z]{1,10}\.(com|org|net)",
    "integer_list": r"\[[0-9]{1,3}(, [0-9]{1,3}){0,4}\]",
    "key_value": r"name=[a-z]{1,8};age=[0-9]{1,2}",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]",
    "semver": r"v[0-9]{1,2}\.[0-9]{1,2}\.[0-9]{1,2}",
    "answer_prefix": r"The answer is (A|B|C|D)\.",
}

# Keywords that a backend must refuse (by name) rather than ignore; anything else must compile.
REFUSED = {
    "outlines": {"unique_items", "not_keyword", "integer_bounds", "integer_exclusive", "number_bounds",
                 "integer_multiple", "person_with_bounds", "format_ipv4", "dict_of_ints", "format_date",
                 "format_datetime", "format_email", "format_uri", "nested_object", "recursive_tree",
                 "recursive_list"},
    "xgrammar": {"unique_items", "not_keyword"},
}
