"""The finished document of a json_schema request, checked with `jsonschema` against the schema the
user sent (annotations and all; the draft named by `$schema`, 2020-12 when none), so a response
says whether it is valid rather than leaving it to trust: `json_schema_valid`, and when false
`json_schema_error` (the validator's message and where in the document)."""

from __future__ import annotations

import functools
import json

import jsonschema

JSON_OBJECT = "$$ANY$$"


# draft 7 reads the forms 2020-12 dropped (tuple `items`, `additionalItems`, `dependencies`)
_OLD_FORMS = ("additionalItems", "dependencies")


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str):
    """The validator of the draft `$schema` names; without one, 2020-12, or draft 7 for a schema
    written in draft 4-7 forms (a schema without `$schema` in the wild is mostly draft 4-7)."""
    schema = json.loads(schema_json)
    default = jsonschema.Draft7Validator if _old_forms(schema) else jsonschema.Draft202012Validator
    cls = jsonschema.validators.validator_for(schema, default=default)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _old_forms(node) -> bool:
    if isinstance(node, dict):
        if isinstance(node.get("items"), list) or any(k in node for k in _OLD_FORMS):
            return True
        return any(_old_forms(v) for k, v in node.items() if k not in ("enum", "const", "default", "examples"))
    if isinstance(node, list):
        return any(_old_forms(v) for v in node)
    return False


def check_document(text: str, schema_json: str) -> dict:
    """{"json_schema_valid": bool[, "json_schema_error": str]} for the output `text`."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        return {"json_schema_valid": False, "json_schema_error": f"not a complete JSON document: {e}"}
    if schema_json == JSON_OBJECT:
        if isinstance(doc, dict):
            return {"json_schema_valid": True}
        return {"json_schema_valid": False, "json_schema_error": "not a JSON object"}
    try:
        error = jsonschema.exceptions.best_match(_validator(schema_json).iter_errors(doc))
    except jsonschema.exceptions.SchemaError as e:  # the schema itself is invalid for its draft
        return {"json_schema_valid": False, "json_schema_error": f"the schema is invalid: {e.message}"}
    except Exception as e:  # noqa: BLE001 - a schema jsonschema cannot read: say so rather than guess
        return {"json_schema_valid": False, "json_schema_error": f"the document could not be validated: {e}"}
    if error is None:
        return {"json_schema_valid": True}
    return {"json_schema_valid": False, "json_schema_error": f"{error.message} (at {error.json_path})"}


def document_check(params, text: str, finished: bool) -> dict:
    """check_document for a finished json_schema request (JSON_OBJECT included); {} otherwise."""
    if not finished or getattr(params, "json_schema", None) is None:
        return {}
    return check_document(text, params.json_schema)
