"""A chat request's tools: which may be called and how (tool_choice, parallel_tool_calls), the
structural tag that enforces it, the tools in the prompt, and the check of the finished calls.

Prompting: a chat template that takes `tools` (transformers' apply_chat_template(tools=...))
renders them itself; for any other template the tools go into the system message as DEFAULT_PROMPT
in the server's call format, earlier calls become that format's text in their assistant turn,
and `tool` results become a user turn of <tool_response> blocks (Hermes' convention).

Grammar: "auto" lets text run until the format's trigger, then the call must name an offered
function and its arguments must follow that function's `parameters`; "required" and a named
function start the reply with a call; parallel_tool_calls false ends the reply after one call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pydantic
import xgrammar as xgr
from xgrammar.openai_tool_call_schema import FunctionToolParam

from arborlm.runtime.constrained.validate import check_document
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.tool_calls.formats import ToolFormat
from arborlm.runtime.tool_calls.parse import ToolCall

# Runs of whitespace inside a call's JSON: enough for any layout a client reads, too few for the
# indentation a small model pads its arguments with (and no room for a whitespace loop).
MAX_WHITESPACE = 1

DEFAULT_PROMPT = """# Tools

You may call one or more functions to help with the user's request. The functions you may call, as JSON signatures:
<tools>
{tools}
</tools>

To call a function, reply with its name and arguments in this form:
{example}"""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict
    strict: bool

    def openai(self) -> dict:
        fn = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolContext:
    fmt: ToolFormat
    tools: tuple[Tool, ...]  # the tools the model may call (a named tool_choice leaves one)
    offered: tuple[Tool, ...]  # every tool in the request (all are shown in the prompt)
    choice: str  # "auto", "required" or "forced"
    parallel: bool

    @classmethod
    def from_request(cls, tools: list | None, tool_choice, parallel: bool | None, fmt: ToolFormat) -> "ToolContext | None":
        """None when no tool may be called (no tools, or tool_choice "none"); a 400 naming the
        field for a malformed tool or a choice that names no offered tool."""
        if tool_choice is not None and not tools and tool_choice != "none":
            raise BadRequestError("tool_choice: needs `tools`")
        if not tools:
            return None
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type", "function") != "function":
                raise BadRequestError(f"tools.{i}.type: only function tools are supported")
        wrapped = []
        for i, t in enumerate(tools):
            try:
                wrapped.append(FunctionToolParam.model_validate({"type": "function", **t}))
            except pydantic.ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise BadRequestError(f"tools.{i}.{where}: {err['msg']}") from None
        everything, _, _ = xgr.normalize_tool_choice(wrapped, "auto")
        names = [f.function.name for f in everything]
        if len(set(names)) != len(names):
            raise BadRequestError("tools: two functions share a name")
        if tool_choice == "none":
            return None
        try:
            functions, _, choice = xgr.normalize_tool_choice(wrapped, "auto" if tool_choice is None else tool_choice)
        except ValueError as e:
            raise BadRequestError(f"tool_choice: {_first_line(e)}") from None
        return cls(fmt, tuple(_tool(f) for f in functions), tuple(_tool(f) for f in everything), choice,
                   True if parallel is None else bool(parallel))

    # ---- grammar -------------------------------------------------------------------------------
    def structural_tag(self) -> dict:
        """Text (none unless "auto") up to the first call, then only more calls, one per line, or
        the end: a reply does not wander back into prose after calling."""
        tags = [self.fmt.tag(t.name, t.parameters, MAX_WHITESPACE) for t in self.tools]
        first = {"type": "triggered_tags", "triggers": [self.fmt.trigger], "tags": tags,
                 "at_least_one": self.choice != "auto", "stop_after_first": True}
        if not self.parallel:
            return {"type": "structural_tag", "format": first}
        more = {"type": "star", "content": {"type": "sequence", "elements": [
            {"type": "const_string", "value": "\n"}, {"type": "or", "elements": tags}]}}
        return {"type": "structural_tag", "format": {"type": "sequence", "elements": [first, more]}}

    @property
    def strict(self) -> bool:
        """A function with strict: true makes the request strict: what the grammar cannot enforce
        in any offered schema is refused rather than checked after (as response_format's strict)."""
        return any(t.strict for t in self.tools)

    # ---- prompt --------------------------------------------------------------------------------
    def system_block(self) -> str:
        return DEFAULT_PROMPT.format(tools="\n".join(json.dumps(t.openai()) for t in self.offered),
                                     example=self.fmt.example())

    # ---- the finished calls --------------------------------------------------------------------
    def check(self, calls: list[ToolCall]) -> dict:
        """json_schema_valid (and json_schema_error) over every call: its function is offered and
        its arguments validate against that function's parameters (with `jsonschema`)."""
        by_name = {t.name: t for t in self.tools}
        for i, call in enumerate(calls):
            tool = by_name.get(call.name)
            if tool is None:
                return {"json_schema_valid": False, "json_schema_error": f"tool_calls.{i}: no offered function is named {call.name!r}"}
            verdict = check_document(call.arguments, json.dumps(tool.parameters))
            if not verdict["json_schema_valid"]:
                return {"json_schema_valid": False,
                        "json_schema_error": f"tool_calls.{i}.function.arguments: {verdict['json_schema_error']}"}
        return {"json_schema_valid": True}


def _tool(f) -> Tool:
    fn = f.function
    params = fn.parameters if fn.parameters is not None else {"type": "object"}
    return Tool(fn.name, fn.description, params, bool(fn.strict))


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines[:3])


def template_takes_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def prompt_messages(messages: list[dict], fmt: ToolFormat, ctx: ToolContext | None, native: bool) -> list[dict]:
    """The messages to give the chat template. native: the template renders tools and tool turns
    itself (arguments become objects, as templates expect); otherwise the history is rewritten as
    the module docstring says, with the tool block in the system message."""
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [_with_object_args(c) for c in m["tool_calls"]]
            out.append(m)
        return out
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [fmt.render(c["function"]["name"], _args_text(c["function"].get("arguments")))
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    if ctx is not None:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + ctx.system_block()).lstrip()}
        else:
            out.insert(0, {"role": "system", "content": ctx.system_block()})
    return out


def _args_text(arguments) -> str:
    if isinstance(arguments, str):
        return arguments if arguments.strip() else "{}"
    return json.dumps(arguments if arguments is not None else {})


def _with_object_args(call: dict) -> dict:
    call = json.loads(json.dumps(call))
    fn = call.get("function") or {}
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass
    return call
