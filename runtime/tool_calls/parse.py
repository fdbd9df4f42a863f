"""Reading tool calls back out of generated text, whole (a finished response) or as it grows (a
stream). One scanner serves both: text outside call envelopes is content; each call keeps the
arguments exactly as the model wrote them (valid JSON, so a client's json.loads works and a
streamed `arguments` concatenates to the same string).

A call that repeats an earlier one of the same reply exactly (the same name, and arguments equal
as JSON: the same keys and values, whatever the spacing or key order) is a loop, not a parallel
call: `distinct` leaves it out of `tool_calls` and reports it, so the response can say so; the
tag guard (constrained/tag_guard.py) ends generation at the first repeat. A stream holds a call
back while it may still become a repeat (it names a function already called) and sends it whole
once complete, or never if it is one."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import regex

from arborlm.runtime.tool_calls.formats import ToolFormat

_NAME = regex.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')
_ARGS = regex.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_CLOSE = regex.compile(r"\s*\}")
_DECODER = json.JSONDecoder()


@dataclass
class ToolCall:
    name: str | None  # None while its name is still being written
    arguments: str  # the JSON text of the arguments as written so far
    complete: bool
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_key(call: ToolCall) -> tuple[str | None, str] | None:
    """What two calls share when one repeats the other: the name and the arguments as canonical
    JSON (keys sorted, no spacing; 1 and 1.0 and true stay distinct). None for arguments that are
    not JSON (an unfinished call)."""
    try:
        args = json.loads(call.arguments)
    except ValueError:
        return None
    return call.name, json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def distinct(calls: list[ToolCall]) -> tuple[list[ToolCall], list[tuple[str, int]]]:
    """(the calls without exact repeats, and for each one left out its name and the index in the
    kept list of the call it repeats)."""
    kept: list[ToolCall] = []
    seen: dict[tuple, int] = {}
    dropped: list[tuple[str, int]] = []
    for call in calls:
        key = call_key(call) if call.complete else None
        if key is not None and key in seen:
            dropped.append((call.name, seen[key]))
            continue
        if key is not None:
            seen[key] = len(kept)
        kept.append(call)
    return kept, dropped


def scan(text: str, fmt: ToolFormat, partial: bool, hold_back: bool | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) in `text`. partial (a stream): a call still being written is returned
    unfinished once its name is known; hold_back (default: partial, a stream in progress): a tail
    that may yet become a call is kept out of the content. Otherwise only finished calls count and
    the rest (a call cut off by max_tokens, a trigger not followed by a call) is content."""
    hold_back = partial if hold_back is None else hold_back
    content, calls, pos = [], [], 0
    while True:
        m = fmt.trigger_re.search(text, pos, partial=hold_back)
        if m is None:
            content.append(text[pos:])
            break
        if m.partial:  # the text ends with what may become a trigger: hold it back
            content.append(text[pos:m.start()])
            break
        got = _calls_at(text, m.start(), fmt, partial)
        if got is not None and not hold_back and got[1] is None and (not got[0] or got[0][-1].name is None):
            got = None  # the text ended before a call's name: nothing was announced, so it is content
        if got is None:  # not a call after all: the trigger's text is content
            content.append(text[pos:m.end()])
            pos = m.end()
            continue
        content.append(text[pos:m.start()])
        found, end = got
        if calls and not content[-1].strip():
            content[-1] = ""  # the spacing between two calls is not content
        calls += found
        if end is None:  # a call still being written reaches the end of the text
            break
        pos = end
    if calls and not content[-1].strip():
        content[-1] = ""  # nor is the spacing after the last one
    return "".join(content), calls


def _calls_at(text: str, i: int, fmt: ToolFormat, partial: bool):
    """The calls of the envelope starting at i and where it ends: (calls, end); end None when the
    text ends inside it (partial only); None when the text there is not a call envelope."""
    m = fmt.head_re.match(text, i, partial=partial)
    if m is None:
        return None
    if m.partial:
        return [], None
    j, calls = m.end(), []
    while True:
        call, j = _call_object(text, j, partial)
        if call is None:
            return (calls, j) if calls and j is not None else None
        calls.append(call)
        if not call.complete:
            return calls, None
        if fmt.between_re is not None:
            sep = fmt.between_re.match(text, j, partial=partial)
            if sep is not None and (sep.partial or sep.end() == len(text)) and partial:
                return calls, None  # the text ends where the list may go on
            if sep is not None and sep.end() < len(text) and text[sep.end()] == "{":
                j = sep.end()
                continue
        break
    m = fmt.tail_re.match(text, j, partial=partial)
    if m is not None and m.partial:
        return calls, None
    if m is not None:
        return calls, m.end()
    return calls, j  # a missing closing tag: the call object itself is whole, so accept it


def _call_object(text: str, j: int, partial: bool) -> tuple[ToolCall | None, int | None]:
    """One `{"name": ..., "arguments": ...}` at j: (call, end). An unfinished one (partial) is
    returned with complete False; (None, j) when the text there is not one."""
    m = _NAME.match(text, j, partial=partial)
    if m is None or m.partial and not partial:
        return None, j
    if m.partial:
        return ToolCall(None, "", False), None
    name = json.loads(m.group(1))
    m = _ARGS.match(text, m.end(), partial=partial)
    if m is None:
        return None, j
    if m.partial:
        return ToolCall(name, "", False), None
    k = m.end()
    try:
        _, end = _DECODER.raw_decode(text, k)
    except ValueError:
        return (ToolCall(name, text[k:], False), None) if partial else (None, j)
    args = text[k:end]
    m = _CLOSE.match(text, end, partial=partial)
    if m is None:
        return None, j
    if m.partial:
        return ToolCall(name, args, False), None
    return ToolCall(name, args, True), m.end()


class ToolCallStream:
    """Turns the growing text of one streamed choice into OpenAI deltas: content as it becomes
    certain, then per call a first delta with its id and name and later ones with the next piece
    of its arguments. A call naming a function already called is held back until it is complete,
    then sent whole, or left out if it repeats an earlier call (`dropped`, as parse.distinct)."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.content_sent = 0
        self.sent: list[ToolCall] = []  # the calls announced so far, arguments as sent
        self.slots: list[int | None] = []  # per call scanned: its index in `sent`, or None (a repeat)
        self.dropped: list[tuple[str, int]] = []  # the repeats left out (as distinct reports them)

    def feed(self, text: str, finished: bool) -> dict:
        """The delta for the text so far ({} when there is nothing new)."""
        content, calls = scan(text, self.fmt, partial=True, hold_back=not finished)
        delta: dict = {}
        if len(content) > self.content_sent:
            delta["content"] = content[self.content_sent:]
            self.content_sent = len(content)
        pieces = []
        for i, call in enumerate(calls):
            if call.name is None:
                break
            if i == len(self.slots) and not self._place(call, calls[:i], finished):
                break  # held back: it may still become a repeat
            k = self.slots[i]
            if k is None:
                continue
            if k == len(self.sent):
                self.sent.append(ToolCall(call.name, "", False))
                pieces.append({"index": k, "id": self.sent[k].id, "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            have = self.sent[k].arguments
            if len(call.arguments) > len(have) and call.arguments.startswith(have):
                more = call.arguments[len(have):]
                self.sent[k].arguments = call.arguments
                if pieces and pieces[-1]["index"] == k:
                    pieces[-1]["function"]["arguments"] += more
                else:
                    pieces.append({"index": k, "function": {"arguments": more}})
        if pieces:
            delta["tool_calls"] = pieces
        return delta

    def _place(self, call: ToolCall, before: list[ToolCall], finished: bool) -> bool:
        """Decide a new call's slot: announced (the next index), a repeat (None), or not yet
        (False: it names a function already called and is not complete)."""
        earlier = [c for c, k in zip(before, self.slots) if k is not None]
        if call.complete:
            key = call_key(call)
            for k, c in enumerate(earlier):
                if key is not None and call_key(c) == key:
                    self.slots.append(None)
                    self.dropped.append((call.name, k))
                    return True
        elif not finished and any(c.name == call.name for c in earlier):
            return False
        self.slots.append(len(self.sent))
        return True

    @property
    def called(self) -> bool:
        return bool(self.sent)
