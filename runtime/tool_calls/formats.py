"""How a model family writes a tool call. Each format is one call object, `{"name": ..., "<args
key>": {...}}`, inside an envelope: Hermes / Qwen `<tool_call>...</tool_call>`, Llama-3's bare JSON,
Mistral's `[TOOL_CALLS][...]`. The same description drives the grammar (a structural tag whose
trigger is the envelope's opening) and the parser."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import regex


@dataclass(frozen=True)
class ToolFormat:
    name: str
    trigger: str  # the text that opens a call: the grammar lets free text run until it appears
    opener: str  # what the grammar writes before the call object
    closer: str  # ... and after it
    args_key: str  # "arguments", or Llama-3's "parameters"
    head: str  # regex: the envelope's opening as a parser accepts it (spacing is free)
    tail: str  # regex: its closing
    between: str | None = None  # regex: between two call objects in one envelope (Mistral's list)
    find: str | None = None  # regex: where a parser looks for a call (None: the trigger itself)

    @property
    def trigger_re(self) -> regex.Pattern:
        """Where a call may start, as a parser looks for it (spacing free, unlike the grammar's)."""
        return _compiled(self.find or regex.escape(self.trigger))

    def tag(self, name: str, schema: dict, max_whitespace: int | None = None) -> dict:
        """The structural-tag item for one function: its name is fixed, its arguments follow `schema`."""
        begin = f'{self.opener}{{"name": {json.dumps(name)}, "{self.args_key}": '
        return {"type": "tag", "begin": begin, "end": "}" + self.closer,
                "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": max_whitespace}}

    def render(self, name: str, arguments: str) -> str:
        """A call as the model writes it (for earlier assistant turns in the history)."""
        return f'{self.opener}{{"name": {json.dumps(name)}, "{self.args_key}": {arguments}}}{self.closer}'

    def example(self) -> str:
        return f'{self.opener}{{"name": <function-name>, "{self.args_key}": <arguments-as-a-JSON-object>}}{self.closer}'

    @property
    def head_re(self) -> regex.Pattern:
        return _compiled(self.head)

    @property
    def tail_re(self) -> regex.Pattern:
        return _compiled(self.tail)

    @property
    def between_re(self) -> regex.Pattern | None:
        return _compiled(self.between) if self.between else None


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


HERMES = ToolFormat("hermes", "<tool_call>", "<tool_call>\n", "\n</tool_call>", "arguments",
                    head=r"<tool_call>\s*", tail=r"\s*</tool_call>")
LLAMA3 = ToolFormat("llama3", '{"name": ', "", "", "parameters", head=r"", tail=r"(\s*;)?",
                    find=r'\{\s*"name"\s*:')
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "[TOOL_CALLS][", "]", "arguments",
                     head=r"\[TOOL_CALLS\]\s*\[\s*", tail=r"\s*\]", between=r"\s*,\s*")
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL)}


def pick_format(name: str, chat_template: str | None) -> ToolFormat:
    """`name` from --tool-call-parser; "auto" reads the chat template: Mistral's and Llama-3's
    markers pick theirs, anything else (a template without tools included) gets Hermes, the
    format our default tool prompt teaches."""
    if name != "auto":
        if name not in FORMATS:
            raise ValueError(f"tool_call_parser: expected auto or one of {sorted(FORMATS)}, got {name!r}")
        return FORMATS[name]
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return HERMES
