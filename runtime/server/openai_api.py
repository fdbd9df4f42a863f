"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions.

Requests become the same SamplingParams as /generate; unknown extra fields are ignored, as the
OpenAI API does, while fields we cannot honour (suffix, best_of != n) get a 400. Tool calling
(tools, tool_choice, parallel_tool_calls) is in arborlm.runtime.tool_calls: a structural tag
enforces the calls (under the tag guard: they close within max_tokens, and a reply ends at a
repeated call), and the reply's text is parsed back into `tool_calls`, exact repeats left out;
`finish_message` says what either changed (tool_note). Both generation routes
stream through one generator, `stream_chunks`; a ChunkFormat holds what differs between them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from arborlm.runtime.constrained.validate import document_check
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.request_check import sample_params
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.server.native_api import SubRequest, stream_all
from arborlm.runtime.server.tokenizer_manager import ReqState, TokenizerManager
from arborlm.runtime.tool_calls import ToolCallStream, ToolContext, ToolFormat, distinct, scan
from arborlm.runtime.tool_calls.request import prompt_messages, template_takes_tools


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extensions, as in SGLang and vLLM
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    stop_regex: str | list[str] | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None
    # operations, as vLLM and SGLang accept them in the body (extra_body with OpenAI's client)
    priority: int | None = None
    timeout: float | None = None  # seconds; past them the reply ends with what it has (finish_message says so)

    def sampling_dict(self, max_tokens: int | None) -> dict:
        d = {
            "max_new_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "stop": self.stop, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "seed": self.seed, "top_k": self.top_k,
            "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
            "min_new_tokens": self.min_tokens, "ignore_eos": self.ignore_eos,
            "stop_token_ids": self.stop_token_ids, "skip_special_tokens": self.skip_special_tokens,
            "regex": self.regex, "ebnf": self.ebnf, "logit_bias": self.logit_bias,
            "spaces_between_special_tokens": self.spaces_between_special_tokens, "no_stop_trim": self.no_stop_trim,
            "stop_regex": self.stop_regex, "timeout": self.timeout,
            "json_schema": json.dumps(self.json_schema) if isinstance(self.json_schema, dict) else self.json_schema,
        }
        return {k: v for k, v in d.items() if v is not None}


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: prompt logprobs, nothing generated
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    _tools: ToolContext | None = PrivateAttr(None)  # set by chat_subs


def usage(states: list[ReqState], prompt_states: list[ReqState] | None = None) -> dict:
    # prompt tokens count once per prompt, not once per sample
    prompts = prompt_states if prompt_states is not None else states
    p = sum(s.prompt_tokens for s in prompts)
    c = sum(len(s.output_ids) for s in states)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in prompts)}}


def finish_reason(st: ReqState) -> str | None:
    """OpenAI's finish reason; a request past its deadline ends as if by max_tokens ("length"),
    with finish_message saying why (finish_note)."""
    r = st.finish_reason
    if not r:
        return None
    return "length" if r.get("timeout") is not None else r["type"]


def finish_note(st: ReqState) -> dict:
    r = st.finish_reason
    return {"finish_message": r["message"]} if st.finished and r and r.get("timeout") is not None else {}


def _samples(ids: list[int], params: SamplingParams, first_index: int, want_logprobs: bool, top: int,
             logprob_start_len: int = -1) -> list[SubRequest]:
    return [SubRequest(first_index + j, ids, params if params.n == 1 else sample_params(params, j),
                       want_logprobs, logprob_start_len, top, None) for j in range(params.n)]


# ---- completions ---------------------------------------------------------------------------------
def completion_subs(req: CompletionRequest, tm: TokenizerManager) -> list[SubRequest]:
    if req.suffix:
        raise BadRequestError("suffix: not supported")
    if req.best_of is not None and req.best_of != req.n:
        raise BadRequestError("best_of: only best_of == n is supported")
    if req.max_tokens == 0 and not req.echo:
        raise BadRequestError("max_tokens: must be >= 1 (0 only with echo)")
    prompt_logprobs = req.echo and req.logprobs is not None  # as the legacy API: echo scores the prompt
    p = req.prompt
    if isinstance(p, str):
        prompts = [tm.encode(p)]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [tm.encode(x) for x in p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    elif p and all(isinstance(x, list) for x in p):
        prompts = [list(x) for x in p]
    else:
        raise BadRequestError("prompt: must be a non-empty string, list of strings, or token ids")
    subs = []
    for ids in prompts:
        sp = req.sampling_dict(req.max_tokens)
        sp["n"] = req.n
        params = SamplingParams.from_dict(sp)
        tm.check_ids(ids, params, "prompt")
        subs += _samples(ids, params, len(subs), req.logprobs is not None, req.logprobs or 0,
                         0 if prompt_logprobs else -1)
    return subs


def completion_logprobs(tm: TokenizerManager, st: ReqState, with_prompt: bool) -> dict:
    pairs, tops = list(st.output_logprobs), list(st.output_top_logprobs)
    if with_prompt:  # echo: the prompt's tokens come first (the first one has no logprob)
        pairs, tops = list(st.input_logprobs) + pairs, list(st.input_top_logprobs) + tops
    tokens = tm.token_texts([t for _, t in pairs])
    offsets, off = [], 0
    for t in tokens:
        offsets.append(off)
        off += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _ in pairs],
        "top_logprobs": [{tm.token_texts([t])[0]: lp for lp, t in top} if lp is not None else None
                         for (lp, _), top in zip(pairs, tops)],
        "text_offset": offsets,
    }


def completion_response(req: CompletionRequest, tm, subs, states, rid, created, model) -> dict:
    choices = []
    for sub, st in zip(subs, states):
        prefix = tm.tokenizer.decode(sub.ids) if req.echo else ""
        choices.append({
            "index": sub.index, "text": prefix + st.text,
            "logprobs": completion_logprobs(tm, st, req.echo) if req.logprobs is not None else None,
            "finish_reason": finish_reason(st), **finish_note(st),
            **document_check(sub.params, st.text, st.finished),
        })
    firsts = [st for sub, st in zip(subs, states) if sub.index % req.n == 0]
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(states, firsts)}


def _echo_opening(req: CompletionRequest, tm: TokenizerManager, sub: SubRequest) -> dict | None:
    """With echo, a stream starts with each choice's prompt."""
    if not req.echo:
        return None
    return {"index": sub.index, "text": tm.tokenizer.decode(sub.ids), "logprobs": None, "finish_reason": None}


def _completion_choice(req: CompletionRequest, tm, sub: SubRequest, st: ReqState, sent: _Sent) -> dict | None:
    delta, reason = st.text[sent.text:], finish_reason(st) if st.finished else None
    if not (delta or reason):
        return None
    return {"index": sub.index, "text": delta, "logprobs": None, "finish_reason": reason, **finish_note(st),
            **document_check(sub.params, st.text, st.finished)}


# ---- chat ----------------------------------------------------------------------------------------
def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    msgs = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequestError(f"messages.{i}.content: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            if m.role != "assistant":
                raise BadRequestError(f"messages.{i}.tool_calls: only assistant messages carry tool calls")
            for j, call in enumerate(m.tool_calls):
                fn = call.get("function")
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise BadRequestError(f"messages.{i}.tool_calls.{j}.function.name: required")
            msg["tool_calls"] = m.tool_calls
        if m.role == "tool" and m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        msgs.append(msg)
    return msgs


def chat_subs(req: ChatCompletionRequest, tm: TokenizerManager, tool_format: ToolFormat) -> list[SubRequest]:
    ctx = ToolContext.from_request(req.tools, req.tool_choice, req.parallel_tool_calls, tool_format)
    req._tools = ctx
    native = template_takes_tools(tm.tokenizer.chat_template)
    msgs = prompt_messages(chat_messages(req), tool_format, ctx, native)
    ids = tm.apply_chat_template(msgs, tools=[t.openai() for t in ctx.offered] if ctx and native else None)
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:  # as OpenAI: up to the end of the context
        max_tokens = max(tm.context_length - len(ids), 1)
    sp = req.sampling_dict(max_tokens)
    sp["n"] = req.n
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        sp["json_schema"] = "$$ANY$$"  # SGLang's spelling: any JSON object (xgrammar's builtin JSON grammar)
    elif rf is not None and rf.type == "json_schema":
        spec = rf.json_schema or {}
        if not isinstance(spec.get("schema"), dict):
            raise BadRequestError("response_format.json_schema.schema: a JSON Schema object is required")
        sp["json_schema"] = json.dumps(spec["schema"])
        sp["json_schema_strict"] = bool(spec.get("strict"))  # OpenAI's strict: refuse what cannot be enforced
    if ctx is not None:
        if rf is not None and rf.type != "text":
            raise BadRequestError("response_format: cannot be combined with tools unless tool_choice is \"none\"")
        sp["structural_tag"] = json.dumps(ctx.structural_tag())
        sp["json_schema_strict"] = ctx.strict
    params = SamplingParams.from_dict(sp)
    tm.check_ids(ids, params, "messages")
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise BadRequestError("top_logprobs: requires logprobs = true")
    return _samples(ids, params, 0, req.logprobs, top)


def _lp_entry(tm, lp, tok) -> dict:
    text = tm.token_texts([tok])[0]
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tm: TokenizerManager, pairs, tops) -> dict:
    content = []
    for (lp, tok), top in zip(pairs, tops):
        entry = _lp_entry(tm, lp, tok)
        entry["top_logprobs"] = [_lp_entry(tm, v, t) for v, t in top]
        content.append(entry)
    return {"content": content}


def chat_response(req: ChatCompletionRequest, tm, subs, states, rid, created, model) -> dict:
    choices = []
    for sub, st in zip(subs, states):
        message, reason, check = {"role": "assistant", "content": st.text}, finish_reason(st), None
        note = finish_note(st)
        if req._tools is not None:
            content, calls = scan(st.text, req._tools.fmt, partial=False)
            calls, dropped = distinct(calls)
            if calls:
                message = {"role": "assistant", "content": content.strip() or None,
                           "tool_calls": [c.openai() for c in calls]}
                reason = tool_finish_reason(reason)
            check = tool_check(req._tools, calls)
            note = tool_note(st, sub.params.max_new_tokens, dropped, note)
        choices.append({
            "index": sub.index, "message": message,
            "logprobs": chat_logprobs(tm, st.output_logprobs, st.output_top_logprobs) if req.logprobs else None,
            "finish_reason": reason, **note,
            **(check if check is not None else document_check(sub.params, st.text, st.finished)),
        })
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(states, states[:1])}


def tool_finish_reason(reason: str | None) -> str | None:
    """A reply that made calls and ended by itself ends with "tool_calls", as OpenAI's."""
    return "tool_calls" if reason == "stop" else reason


def tool_note(st: ReqState, max_tokens: int, dropped: list[tuple[str, int]], note: dict) -> dict:
    """`finish_message` for what changed a tool reply: calls left out as repeats of earlier ones
    (parse.distinct), and what the tag guard did to end it within max_tokens (its finish reason's
    "guard" list, constrained/tag_guard.py), after any other message (a deadline's)."""
    if not st.finished:
        return note
    guard = (st.finish_reason or {}).get("guard") or ()
    parts = [note["finish_message"]] if note.get("finish_message") else []
    for name, k in dropped:
        parts.append(f"tool_calls: a repeat of tool_calls[{k}] ({name}, the same arguments) was left out"
                     + ("; the reply was ended there" if "repeat" in guard else ""))
    if "repeat" in guard and not dropped:
        parts.append("tool_calls: the reply was ended where it repeated an earlier call")
    if "closed" in guard:
        parts.append(f"max_tokens: the call was steered to close within max_tokens ({max_tokens}); its arguments "
                     "may be shorter than the model would have written")
    if "no_more" in guard:
        parts.append(f"max_tokens: the reply was ended after its last complete call, as what was left of max_tokens "
                     f"({max_tokens}) would not hold another")
    return {"finish_message": " ".join(p if p.endswith(".") else p + "." for p in parts)} if parts else {}


def tool_check(ctx: ToolContext, calls) -> dict:
    """json_schema_valid for the calls of a finished tool reply (see ToolContext.check)."""
    if not calls:
        if ctx.choice == "auto":
            return {}
        return {"json_schema_valid": False, "json_schema_error": "tool_calls: tool_choice requires a call and the "
                                                                 "reply holds no complete one"}
    return ctx.check(calls)


def _role_opening(req: ChatCompletionRequest, tm, sub: SubRequest) -> dict:
    """A chat stream starts each choice with the assistant's role, as OpenAI's."""
    return {"index": sub.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def _chat_choice(req: ChatCompletionRequest, tm: TokenizerManager, sub: SubRequest, st: ReqState,
                 sent: _Sent) -> dict | None:
    delta, reason = _chat_delta(req, sub, st, sent)
    lps = None
    if req.logprobs and len(st.output_logprobs) > sent.logprobs:
        lps = chat_logprobs(tm, st.output_logprobs[sent.logprobs:], st.output_top_logprobs[sent.logprobs:])
    if not (delta or reason or lps):
        return None
    note = finish_note(st)
    if req._tools is not None and sent.tools is not None:
        note = tool_note(st, sub.params.max_new_tokens, sent.tools.dropped, note)
    return {"index": sub.index, "delta": delta, "logprobs": lps, "finish_reason": reason, **note,
            **_final_check(req, sub, st)}


def _chat_delta(req: ChatCompletionRequest, sub, st: ReqState, sent: _Sent) -> tuple[dict, str | None]:
    """The next delta of one streamed choice, and its finish reason once it ends; with tools, the
    choice's ToolCallStream turns the text into content and tool-call deltas."""
    reason = finish_reason(st) if st.finished else None
    if req._tools is None:
        delta = st.text[sent.text:]
        return ({"content": delta} if delta else {}), reason
    if sent.tools is None:
        sent.tools = ToolCallStream(req._tools.fmt)
    delta = sent.tools.feed(st.text, st.finished)
    if sent.tools.called and reason is not None:
        reason = tool_finish_reason(reason)
    return delta, reason


def _final_check(req: ChatCompletionRequest, sub, st: ReqState) -> dict:
    """What the last chunk of a streamed choice says of its validity (nothing before it ends)."""
    if not st.finished:
        return {}
    if req._tools is not None:
        return tool_check(req._tools, distinct(scan(st.text, req._tools.fmt, partial=False)[1])[0])
    return document_check(sub.params, st.text, st.finished)


def new_id(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


# ---- running -------------------------------------------------------------------------------------
async def final_states(tm: TokenizerManager, subs: list[SubRequest]) -> list[ReqState]:
    return list(await asyncio.gather(*(s.final(tm) for s in subs)))


@dataclass
class _Sent:
    """How much of one choice a stream has sent."""

    text: int = 0
    logprobs: int = 0
    tools: ToolCallStream | None = None  # a chat reply with tools: parses the calls out of the text


@dataclass(frozen=True)
class ChunkFormat:
    """What differs between the streams of the two routes: the chunks' object, a choice's opening
    chunk (if any), and its next chunk after an update (None when the update says nothing new)."""

    object: str
    opening: Callable[[Any, TokenizerManager, SubRequest], dict | None]
    choice: Callable[[Any, TokenizerManager, SubRequest, ReqState, _Sent], dict | None]


COMPLETION_CHUNKS = ChunkFormat("text_completion", _echo_opening, _completion_choice)
CHAT_CHUNKS = ChunkFormat("chat.completion.chunk", _role_opening, _chat_choice)


async def stream_chunks(fmt: ChunkFormat, req: _Common, tm: TokenizerManager, subs: list[SubRequest], rid: str,
                        created: int, model: str) -> AsyncIterator[dict]:
    """The chunks of a streamed reply: each choice's opening, one chunk per update that says
    something new, then the usage when stream_options asks for it."""
    head = {"id": rid, "object": fmt.object, "created": created, "model": model}
    for sub in subs:
        opening = fmt.opening(req, tm, sub)
        if opening is not None:
            yield {**head, "choices": [opening]}
    sent: dict[int, _Sent] = {}
    finals: dict[int, ReqState] = {}
    async for sub, st in stream_all(subs, tm):
        progress = sent.setdefault(sub.index, _Sent())
        choice = fmt.choice(req, tm, sub, st, progress)
        progress.text, progress.logprobs = len(st.text), len(st.output_logprobs)
        if choice is not None:
            yield {**head, "choices": [choice]}
        if st.finished:
            finals[sub.index] = st
    if req.stream_options and req.stream_options.include_usage:
        states = [finals[s.index] for s in subs]
        firsts = [finals[s.index] for s in subs if s.index % req.n == 0]  # one per prompt
        yield {**head, "choices": [], "usage": usage(states, firsts)}
