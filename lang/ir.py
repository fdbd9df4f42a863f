"""A program's expressions: what `s += ...` appends. Plain data, executed later by the interpreter
so that building a program never waits on the model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

# SGLang's regexes for gen(dtype=...), the same strings (sglang/lang/ir.py)
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""

DTYPE_REGEX = {int: REGEX_INT, "int": REGEX_INT, float: REGEX_FLOAT, "float": REGEX_FLOAT,
               bool: REGEX_BOOL, "bool": REGEX_BOOL, str: REGEX_STR, "str": REGEX_STR}


@dataclass
class SglSamplingParams:
    """The DSL's sampling arguments (SGLang's frontend names and class name, distinct from the runtime's
    validated SamplingParams); None means "use the run default"."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    regex: str | None = None
    json_schema: str | None = None
    structural_tag: str | None = None  # set by gen(tools=...)
    json_schema_strict: bool | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None

    REQUEST_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")

    def merged(self, defaults: "SglSamplingParams") -> "SglSamplingParams":
        """Fields set here win over the run's defaults."""
        return SglSamplingParams(**{f.name: v if (v := getattr(self, f.name)) is not None
                                    else getattr(defaults, f.name) for f in dataclasses.fields(self)})

    def sampling_dict(self) -> dict[str, Any]:
        """The runtime's `sampling_params` (unset fields left to the runtime's defaults)."""
        return {f.name: v for f in dataclasses.fields(self)
                if f.name not in self.REQUEST_FIELDS and (v := getattr(self, f.name)) is not None}

    def request_dict(self) -> dict[str, Any]:
        """The per-request logprob fields of a /generate body."""
        return {k: v for k in self.REQUEST_FIELDS if (v := getattr(self, k)) is not None}


class Expr:
    """Anything `s += ...` accepts; `+` chains expressions (and strings) into a list."""

    def __add__(self, other):
        return ExprList([self, other])

    def __radd__(self, other):
        return ExprList([other, self])


@dataclass(eq=False)
class ExprList(Expr):
    items: list = field(default_factory=list)

    def __post_init__(self):
        flat = []
        for it in self.items:
            flat.extend(it.items if isinstance(it, ExprList) else [it])
        self.items = flat


@dataclass(eq=False)
class Gen(Expr):
    name: str | None
    params: SglSamplingParams
    dtype: type | None = None
    schema_model: type | None = None  # a pydantic model class: parsed values are its instances
    tools: Any = None  # a runtime ToolContext: the reply's calls go into the meta info

    def tool_meta(self, text: str) -> dict:
        """{"tool_calls": [...], "content": ...} parsed from a finished reply ({} without tools); a
        call that exactly repeats an earlier one is left out and counted in "repeats_dropped"."""
        if self.tools is None:
            return {}
        from arborlm.runtime.tool_calls import distinct, scan

        content, calls = scan(text, self.tools.fmt, partial=False)
        calls, dropped = distinct(calls)
        extra = {"repeats_dropped": len(dropped)} if dropped else {}
        return {"tool_calls": [c.openai() for c in calls], "content": content, **extra, **self.tools.check(calls)}

    def parse(self, text: str):
        """The typed value of the generated text (int, pydantic object, JSON value) or the text."""
        if self.schema_model is not None:
            return self.schema_model.model_validate_json(text)
        if self.params.json_schema is not None:
            return json.loads(text)
        kind = {int: "int", float: "float", bool: "bool", str: "str"}.get(self.dtype, self.dtype)
        if kind == "int":
            return int(text.strip())
        if kind == "float":
            return float(text.strip())
        if kind == "bool":
            return text.strip() == "True"
        if kind == "str" and self.params.regex == REGEX_STR:
            return json.loads(text)
        return text


@dataclass(eq=False)
class Select(Expr):
    name: str | None
    choices: list[str]
    temperature: float
    choices_method: Any


@dataclass(eq=False)
class SetVar(Expr):
    """`s[name] = value` (SGLang's ProgramState.__setitem__): applied in order with the appends."""

    name: str
    value: Any


@dataclass(eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(eq=False)
class VarScopeBegin(Expr):
    name: str


@dataclass(eq=False)
class VarScopeEnd(Expr):
    name: str
