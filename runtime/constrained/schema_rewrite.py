"""Bring a JSON Schema within what a backend enforces.

`rewrite` makes exact rewrites (the same documents stay valid), applied in every mode:
- `oneOf` -> `anyOf` where no document can match two branches (each branch takes different JSON
  types, or different `const` / `enum` values, itself or in a required discriminator property);
- draft 4's tuple `items: [...]` (+ `additionalItems`) -> `prefixItems` (+ `items`);
- `dependencies` -> `dependentRequired` (name lists) / `dependentSchemas` (schemas);
- a `required` name missing from `properties` -> a property of any JSON value there (when other
  properties are allowed; without that, as without `properties`, it is left for the check);
- `allOf` branches merged into their node where they do not conflict;
- a `$ref` into the middle of a schema (`#/definitions/a/properties/b`) -> one to a copy under
  `$defs`, so the rewrites below cannot move its target; raw control characters in a `pattern`
  -> their escapes.

`relax` (non-strict requests) then drops what the backend still cannot enforce, naming each drop:
the grammar generates under the rest, and the finished document is validated against the schema
as sent (validate.py), so an output that misses a dropped keyword is flagged, never passed off as
valid. Strict requests skip `relax`: schema_check.py refuses such a keyword by name instead.
"""

from __future__ import annotations

import copy
import json

from arborlm.runtime.constrained.schema_check import ALONE, ANNOTATIONS, LENGTH, LOOKAROUND, Support

_SUB_ONE = ("items", "additionalProperties", "propertyNames", "contains", "not", "if", "then", "else",
            "unevaluatedItems", "unevaluatedProperties")
_SUB_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUB_LIST = ("anyOf", "allOf", "oneOf", "prefixItems")
ANY_SCALAR = {"type": ["string", "number", "boolean", "null"]}
_LOCAL = {"additionalProperties", "patternProperties", "unevaluatedProperties", "additionalItems", "unevaluatedItems",
          "prefixItems"}


def _children(node: dict):
    """(container, key, path step) of every direct subschema of `node`."""
    for key in _SUB_ONE:
        if isinstance(node.get(key), dict):
            yield node, key, key
    for key in _SUB_MAP:
        if isinstance(node.get(key), dict):
            for name in node[key]:
                yield node[key], name, f"{key}/{name}"
    for key in _SUB_LIST:
        if isinstance(node.get(key), list):
            for i in range(len(node[key])):
                yield node[key], i, f"{key}/{i}"


# ---- exact rewrites --------------------------------------------------------------------------------
def rewrite(schema):
    schema = hoist_refs(copy.deepcopy(schema))
    _rewrite(schema)
    return schema


def hoist_refs(schema):
    """Point every local $ref at a copy of its target under $defs (when it is not already a direct
    child of $defs or definitions), so that merging and moving keywords below cannot break it: a
    reference such as `#/definitions/a/properties/b` names a place the rewrites may restructure,
    and `#/definitions/a/webhooks` one that dropping annotations removes (run it first). Changes
    `schema` in place and returns it."""
    if not isinstance(schema, dict):
        return schema
    refs = {n["$ref"] for n in _ref_nodes(schema)}
    moved = {}
    for ref in sorted(refs):
        parts = ref[2:].split("/") if ref.startswith("#/") else None
        if parts is None or len(parts) == 2 and parts[0] in ("$defs", "definitions"):
            continue
        target = _resolve(schema, ref)
        if target is not None:
            moved[ref] = (f"_ref{len(moved)}", copy.deepcopy(target))
    if moved:
        defs = schema.setdefault("$defs", {}) if isinstance(schema.get("$defs", {}), dict) else None
        if defs is None:
            return schema
        for ref, (name, target) in moved.items():
            defs[name] = target
        new = {ref: f"#/$defs/{name}" for ref, (name, _) in moved.items()}
        for n in list(_ref_nodes(schema)):
            n["$ref"] = new.get(n["$ref"], n["$ref"])
    return schema


def _ref_nodes(node):
    """Every schema object holding a string $ref (data values such as enum and const are skipped)."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node
        for k, v in node.items():
            if k not in ("enum", "const", "default", "examples"):
                yield from _ref_nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _ref_nodes(v)


def _rewrite(node) -> None:
    if not isinstance(node, dict):
        return
    if isinstance(node.get("pattern"), str) and any(c in node["pattern"] for c in "\n\r\t"):
        # a control character written raw (inside a character class, say) is the same as its escape,
        # which every regex-to-grammar compiler reads
        node["pattern"] = node["pattern"].replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if isinstance(node.get("items"), list):  # draft 4 tuple form
        node["prefixItems"] = node.pop("items")
        if "additionalItems" in node:
            node["items"] = node.pop("additionalItems")
    if isinstance(node.get("dependencies"), dict):
        for name, dep in node.pop("dependencies").items():
            key = "dependentRequired" if isinstance(dep, list) else "dependentSchemas"
            node.setdefault(key, {})[name] = dep
    for container, key, _ in list(_children(node)):
        _rewrite(container[key])
    if isinstance(node.get("oneOf"), list) and "anyOf" not in node and _exclusive(node["oneOf"]):
        node["anyOf"] = node.pop("oneOf")
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        merged = _merge_all(node)
        if merged is not None:
            node.clear()
            node.update(merged)
    required = node.get("required")
    if isinstance(required, list) and isinstance(node.get("properties"), dict) \
            and node.get("additionalProperties", True) is not False:
        for name in required:
            if isinstance(name, str) and name not in node["properties"]:
                node["properties"][name] = {}


def _types(s) -> set | None:
    """The JSON types a branch admits, when it says (integer counts as number too)."""
    if not isinstance(s, dict):
        return None
    if "const" in s:
        return {_json_type(s["const"])}
    if isinstance(s.get("enum"), list):
        return {_json_type(v) for v in s["enum"]}
    t = s.get("type")
    if t is None:
        return None
    out = set(t if isinstance(t, list) else [t])
    if "integer" in out:
        out.add("number")
    return out


def _json_type(v) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}[type(v)]


def _values(s) -> list | None:
    if isinstance(s, dict) and "const" in s:
        return [s["const"]]
    if isinstance(s, dict) and isinstance(s.get("enum"), list):
        return s["enum"]
    return None


def _disjoint(groups: list[list]) -> bool:
    seen = []
    for g in groups:
        for v in g:
            if any(v == w and type(v) is type(w) for w in seen):
                return False
        seen += g
    return True


def _exclusive(branches: list) -> bool:
    types = [_types(b) for b in branches]
    if all(t is not None for t in types) and all(not (a & b) for i, a in enumerate(types) for b in types[i + 1:]):
        return True
    values = [_values(b) for b in branches]
    if all(v is not None for v in values) and _disjoint(values):
        return True
    # a discriminator: a property every branch requires, with disjoint const / enum values
    if all(isinstance(b, dict) and isinstance(b.get("properties"), dict) for b in branches):
        common = set.intersection(*(set(b.get("required", [])) & set(b["properties"]) for b in branches))
        for name in sorted(common):
            vals = [_values(b["properties"][name]) for b in branches]
            if all(v is not None for v in vals) and _disjoint(vals):
                return True
    return False


def _merge_all(node: dict) -> dict | None:
    """The node with its allOf branches folded in, or None where two of them conflict."""
    # these read the properties / items of their own schema object only: merging would change them
    if any(isinstance(b, dict) and set(b) & _LOCAL for b in [node, *node["allOf"]]):
        return None
    out = {k: v for k, v in node.items() if k != "allOf"}
    for branch in node["allOf"]:
        if not isinstance(branch, dict) or "$ref" in branch:
            return None
        for key, value in branch.items():
            if key in ANNOTATIONS:
                continue
            if key not in out:
                out[key] = copy.deepcopy(value)
            elif key == "required":
                out[key] = list(dict.fromkeys(list(out[key]) + list(value)))
            elif key == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    if name not in out[key]:
                        out[key][name] = copy.deepcopy(sub)
                    elif out[key][name] != sub:
                        return None
            elif out[key] != value:
                return None
    return out


# ---- relaxing for non-strict requests --------------------------------------------------------------
def relax(schema, support: Support) -> tuple[object, list[str]]:
    """A copy without what `support` cannot enforce, and a list of "keyword at path" drops."""
    schema = copy.deepcopy(schema)
    dropped: list[str] = []
    _relax(schema, support, "#", dropped, _Loosening(schema, max(LOOSEN_BUDGET, len(json.dumps(schema)) // 4)))
    return schema, dropped


# Characters of schema text the loosening may add by copying (siblings into anyOf branches, a
# $ref's target inlined), at least, or a quarter of the schema's own size: without a bound, folding
# nested in nested multiplies a large schema (package.json: 130 KB relaxed -> 690 KB, and minutes
# of grammar compilation instead of seconds).
LOOSEN_BUDGET = 64_000


class _Loosening:
    def __init__(self, root, budget: int):
        self.root, self.left = root, budget

    def spend(self, *parts, times: int = 1) -> bool:
        cost = times * sum(len(json.dumps(p)) for p in parts)
        if cost > self.left:
            return False
        self.left -= cost
        return True




def _loosen(node: dict, lo: "_Loosening", path: str, dropped: list[str], inlining: frozenset) -> str | None:
    """Keep what a backend would ignore rather than drop it, enforcing a superset where exactness
    is lost (the document is validated against the schema as sent, so nothing passes unflagged):
    a non-exclusive `oneOf` becomes `anyOf` (exclusivity verified after), `if`/`then`/`else`
    becomes `anyOf` [if and then, else] (that a document meeting `if` meets `then` is verified
    after); keywords beside an
    `anyOf` go into each branch, beside a `$ref` or an `allOf` into one merged schema (the local
    reference inlined once); `allOf` branches that do not merge exactly are merged loosely; a
    property that may not appear (`false`) is left out. Returns the reference inlined, if any."""
    for key in ("properties", "patternProperties"):
        if isinstance(node.get(key), dict):
            for name in [n for n, sub in node[key].items() if sub is False]:
                del node[key][name]
                dropped.append(f"{key}/{name} at {path} (false: may not appear, verified after)")
    if isinstance(node.get("oneOf"), list) and "anyOf" not in node:
        node["anyOf"] = node.pop("oneOf")
        dropped.append(f"oneOf exclusivity at {path} (enforced as anyOf)")
    if isinstance(node.get("if"), dict) and isinstance(node.get("else"), dict) and "anyOf" not in node:
        then = node.pop("then", {})
        node["anyOf"] = [_merge_loose(node.pop("if"), then if isinstance(then, dict) else {}), node.pop("else")]
        dropped.append(f"if/then/else at {path} (enforced as anyOf [if+then, else])")
    root, inlined = lo.root, []

    def only_ref(b):
        return isinstance(b, dict) and set(b) == {"$ref"}

    def replace(merged, what):
        keep = {k: v for k, v in node.items() if k in ANNOTATIONS}
        node.clear()
        node.update(keep)
        node.update(merged)
        dropped.append(f"{what} at {path} (merged with what stands beside it)")

    # 1. allOf: its branches (a lone local $ref inlined) merged into the node itself
    if isinstance(node.get("allOf"), list) and (len(node["allOf"]) > 1 or set(node) - ANNOTATIONS - {"allOf"}):
        refs = [b["$ref"] for b in node["allOf"] if only_ref(b)]
        parts = [_resolve(root, b["$ref"]) if only_ref(b) else b for b in node["allOf"]]
        if all(isinstance(p, dict) for p in parts) and not set(refs) & inlining \
                and lo.spend(*[p for b, p in zip(node["allOf"], parts) if only_ref(b)]):
            merged = {k: v for k, v in node.items() if k not in ANNOTATIONS and k != "allOf"}
            for part in parts:
                merged = _merge_loose(merged, part)
            replace(merged, "allOf")
            inlined += refs
    # 2. a $ref with keywords beside it: its target inlined and merged with them
    rest = {k: v for k, v in node.items() if k not in ANNOTATIONS and k != "$ref"}
    if "$ref" in node and rest and node["$ref"] not in inlining:
        target = _resolve(root, node["$ref"])
        if isinstance(target, dict) and "$ref" not in target and lo.spend(target):
            inlined.append(node["$ref"])
            replace(_merge_loose(rest, target), "$ref")
    # 3. an anyOf with keywords beside it: they go into every branch
    siblings = {k: v for k, v in node.items() if k not in ANNOTATIONS and k != "anyOf"}
    if isinstance(node.get("anyOf"), list) and siblings and "allOf" not in node and "$ref" not in node \
            and lo.spend(siblings, times=len(node["anyOf"]) - 1):
        node["anyOf"] = [_merge_loose(b, siblings) for b in node["anyOf"]]
        for k in siblings:
            del node[k]
    return "|".join(inlined) or None


# single subschemas that apply to every item / property: in both, each must meet both
_MERGE_ONE = ("items", "additionalProperties", "propertyNames", "unevaluatedItems", "unevaluatedProperties")


def _merge_loose(a, b):
    """a and b in one schema object: required united, properties united (one in both merged the
    same way, as are `items`, `additionalProperties` and the other single subschemas both set),
    types intersected, a's value for any other keyword both set."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return a
    out = copy.deepcopy(a)
    for key, value in b.items():
        if key in ANNOTATIONS:
            continue
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif key == "required" and isinstance(out[key], list) and isinstance(value, list):
            out[key] = list(dict.fromkeys(out[key] + value))
        elif key in _SUB_MAP and isinstance(out[key], dict) and isinstance(value, dict):
            for name, sub in value.items():  # a property in both must meet both: merged the same way
                out[key][name] = _merge_loose(out[key][name], sub) if name in out[key] else copy.deepcopy(sub)
        elif key in _MERGE_ONE and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge_loose(out[key], value)  # items in both: each item meets both
        elif key == "type":
            ta = set(out[key]) if isinstance(out[key], list) else {out[key]}
            tb = set(value) if isinstance(value, list) else {value}
            both = ta & tb  # an integer is a number: integer and number meet in integer
            if "integer" in ta and "number" in tb or "number" in ta and "integer" in tb:
                both.add("integer")
            if both:
                out[key] = sorted(both) if len(both) > 1 else both.pop()
    return out


def _resolve(root, ref):
    """The subschema a local `#/...` reference points at (None if it is not one)."""
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _relax(node, s: Support, path: str, dropped: list[str], lo: _Loosening, inlining: frozenset = frozenset()) -> None:
    if not isinstance(node, dict):
        return
    for _ in range(4):  # again while it changes something: an inlined target may bring its own oneOf or allOf
        before = len(dropped)
        inlined = _loosen(node, lo, path, dropped, inlining)
        if inlined:
            inlining = inlining | set(inlined.split("|"))
        if len(dropped) == before:
            break

    def drop(*keys):
        for k in keys:
            if k in node:
                del node[k]
                dropped.append(f"{k} at {path}")

    for key in list(node):
        if key not in s.keywords and key not in ANNOTATIONS:
            drop(key)
    for key in ALONE:
        if key in node:
            drop(*sorted(set(node) - ANNOTATIONS - {key, "type"}))
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:  # unmergeable: keep the first
        dropped.append(f"allOf branches 2..{len(node['allOf'])} at {path}")
        node["allOf"] = node["allOf"][:1]
    if "items" in node and not isinstance(node["items"], dict):
        drop("items")
    if "multipleOf" in node and node.get("type") != "integer":
        drop("multipleOf")
    if "format" in node and node["format"] not in s.formats:
        drop("format")
    if isinstance(node.get("pattern"), str) and LOOKAROUND.search(node["pattern"]):
        drop("pattern")
    has_length = any(k in node for k in LENGTH)
    if "pattern" in node and (has_length and not s.pattern_with_length or "format" in node):
        drop(*LENGTH, "format")
    if "format" in node and has_length:
        drop(*LENGTH)
    if "required" in node and "properties" not in node:
        node["properties"] = {name: {} for name in node["required"] if isinstance(name, str)}
    if "properties" in node:
        for name in node.get("required", []):
            if isinstance(name, str) and name not in node["properties"]:
                node["properties"][name] = {}
        if not s.size_with_properties:
            drop("minProperties", "maxProperties")
    for container, key, step in list(_children(node)):
        sub = container[key]
        if not s.empty_schema and isinstance(sub, dict) and not set(sub) - ANNOTATIONS:
            container[key] = dict(ANY_SCALAR)  # narrower than any JSON value: outputs stay valid
            dropped.append(f"{{}} at {path}/{step} (narrowed to a scalar)")
        _relax(container[key], s, f"{path}/{step}", dropped, lo, inlining)
