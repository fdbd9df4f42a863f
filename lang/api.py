"""The public DSL functions, named as in SGLang's frontend (`import arborlm.lang as sgl`)."""

from __future__ import annotations

import json

from arborlm.lang import choices as _choices
from arborlm.lang import ir
from arborlm.lang.program import Function


def function(func=None, *, num_api_spec_tokens=None):
    """Decorator: a program whose first parameter is the state `s`."""
    if func is None:
        return lambda f: Function(f)
    return Function(func)


def _schema(json_schema) -> tuple[str | None, type | None]:
    """A dict, a JSON string or a pydantic model class -> (JSON string, model class or None)."""
    if json_schema is None or isinstance(json_schema, str):
        return json_schema, None
    if isinstance(json_schema, dict):
        return json.dumps(json_schema), None
    if isinstance(json_schema, type) and hasattr(json_schema, "model_json_schema"):
        return json.dumps(json_schema.model_json_schema()), json_schema
    raise TypeError(f"json_schema: a dict, a JSON string or a pydantic model class, got {json_schema!r}")


def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None,
        stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        min_p: float | None = None, frequency_penalty: float | None = None, presence_penalty: float | None = None,
        ignore_eos: bool | None = None, return_logprob: bool | None = None, logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None, dtype: type | None = None,
        choices: list[str] | None = None, choices_method=None, regex: str | None = None, json_schema=None):
    """Generate into variable `name`; with `choices`, the same as select(name, choices)."""
    if choices is not None:
        return select(name, choices, temperature=temperature or 0.0,
                      choices_method=choices_method or _choices.token_length_normalized)
    if dtype not in (None, int, str):
        raise TypeError(f"gen {name!r}: dtype must be int or str, got {dtype!r}")
    if regex is None and dtype is not None:
        regex = ir.REGEX_INT if dtype is int else ir.REGEX_STR
    schema, model = _schema(json_schema)
    if regex is not None and schema is not None:
        raise ValueError(f"gen {name!r}: pass regex or json_schema, not both")
    params = ir.SamplingParams(max_tokens, min_tokens, stop, stop_token_ids, temperature, top_p, top_k, min_p,
                               frequency_penalty, presence_penalty, ignore_eos, regex, schema, return_logprob,
                               logprob_start_len, top_logprobs_num, return_text_in_logprobs)
    return ir.Gen(name, params, dtype, model)


def gen_int(name: str | None = None, **kwargs):
    return gen(name, dtype=int, **kwargs)


def gen_string(name: str | None = None, **kwargs):
    return gen(name, dtype=str, **kwargs)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0,
           choices_method: _choices.ChoicesSamplingMethod = _choices.token_length_normalized):
    """Pick one of `choices` by its logprob given the text so far, scored in one batched request."""
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"select {name!r}: choices must be a non-empty list of strings, got {choices!r}")
    if not isinstance(choices_method, _choices.ChoicesSamplingMethod):
        raise TypeError(f"select {name!r}: choices_method must be a ChoicesSamplingMethod, got {choices_method!r}")
    return ir.Select(name, list(choices), temperature, choices_method)


def _role(role: str, expr=None):
    items = [ir.RoleBegin(role)] + ([] if expr is None else [expr]) + [ir.RoleEnd(role)]
    return ir.ExprList(items)


def system(expr=None):
    return _role("system", expr)


def user(expr=None):
    return _role("user", expr)


def assistant(expr=None):
    return _role("assistant", expr)


def system_begin():
    return ir.RoleBegin("system")


def system_end():
    return ir.RoleEnd("system")


def user_begin():
    return ir.RoleBegin("user")


def user_end():
    return ir.RoleEnd("user")


def assistant_begin():
    return ir.RoleBegin("assistant")


def assistant_end():
    return ir.RoleEnd("assistant")
