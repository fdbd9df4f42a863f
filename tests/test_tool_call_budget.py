"""Forced tool calls close within max_tokens and a reply that repeats a call ends there (issue 26,
item 5): with `get_weather` and `find_book`, temperature 0 and max_tokens 128, a forced call came
back with finish_reason "length", or closed after 86 tokens with the same find_book call twice.

The guard (runtime/constrained/tag_guard.py) is checked three ways: against any model (a seeded
random one, and one that writes the same call over and over, each choosing among the tokens the
mask allows), on the real model with the failing request itself, and through the OpenAI response
and stream builders (repeats left out, finish_message saying so)."""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest
import torch

from arborlm.runtime.constrained.base import GrammarSpec, bitmask_words
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.tool_calls import FORMATS, ToolCallStream, ToolContext, distinct, scan
from arborlm.runtime.tool_calls.parse import ToolCall
from arborlm.runtime.tool_calls.request import prompt_messages, template_takes_tools

from test_tool_calls import WEATHER  # the get_weather(city maxLength 40, unit enum)

HERMES = FORMATS["hermes"]
BOOK = {"type": "function", "function": {
    "name": "find_book", "description": "Find a book by its title and year",
    "parameters": {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
                   "required": ["title", "year"], "additionalProperties": False}}}
TOOLS = [WEATHER, BOOK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What's the weather in Paris, and find me the book The Nightingale"}]
NAMED = {"type": "function", "function": {"name": "find_book"}}
LOOP = '<tool_call>\n{"name": "find_book", "arguments": {"title": "The Nightingale", "year": 2022}}\n</tool_call>'


def _valid_calls(calls):
    assert calls
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])


# ---- repeats, parsed (no model) ------------------------------------------------------------------
def test_distinct_leaves_out_exact_repeats_only():
    calls = [ToolCall("find_book", '{"title": "A", "year": 1}', True),
             ToolCall("find_book", '{ "year": 1,"title":"A" }', True),  # the same, other spacing and order
             ToolCall("find_book", '{"title": "A", "year": 1.0}', True),  # 1.0 is not 1
             ToolCall("get_weather", '{"title": "A", "year": 1}', True),  # another function
             ToolCall("find_book", '{"title": "A", "year": 1}', True)]
    kept, dropped = distinct(calls)
    assert [(c.name, c.arguments) for c in kept] == [(c.name, c.arguments) for c in (calls[0], calls[2], calls[3])]
    assert dropped == [("find_book", 0), ("find_book", 0)]


def test_stream_holds_back_a_possible_repeat_and_never_sends_it():
    weather = HERMES.render("get_weather", '{"city": "Paris"}')
    text = LOOP + "\n" + weather + "\n" + LOOP.replace('"year": 2022}', '"year": 2022 }')
    stream, names, args, dropped_early = ToolCallStream(HERMES), {}, {}, None
    for k in range(1, len(text) + 1):
        for piece in stream.feed(text[:k], finished=k == len(text)).get("tool_calls", []):
            if "id" in piece:
                names[piece["index"]] = piece["function"]["name"]
            args[piece["index"]] = args.get(piece["index"], "") + piece["function"]["arguments"]
        if k == len(LOOP) + 1 + len(weather) + 40:  # inside the third call: held back, nothing sent for it
            dropped_early = dict(names)
    assert dropped_early == {0: "find_book", 1: "get_weather"}
    kept, dropped = distinct(scan(text, HERMES, partial=False)[1])
    assert [(names[i], args[i]) for i in sorted(names)] == [(c.name, c.arguments) for c in kept]
    assert stream.dropped == dropped == [("find_book", 0)]


# ---- the guard against any model (the real tokenizer, no model) ----------------------------------
@pytest.fixture(scope="module")
def backend(tokenizer):
    from arborlm.runtime.constrained.xgrammar_backend import XGrammarBackend

    return XGrammarBackend(tokenizer, tokenizer.eos_token_id, len(tokenizer))


@pytest.fixture(scope="module")
def tables(tokenizer):
    from arborlm.runtime.constrained.json_guard import JsonGuard
    from arborlm.runtime.constrained.vocab import token_bytes

    return JsonGuard(token_bytes(tokenizer), len(tokenizer), 512, 16)


def _guarded(backend, tables, fmt, choice, parallel):
    from arborlm.runtime.constrained.tag_guard import TagGuardedMatcher, tag_markers

    value = json.dumps(ToolContext.from_request(TOOLS, choice, parallel, fmt).structural_tag())
    inner = backend.compile(GrammarSpec("structural_tag", value, strict=False)).matcher()
    return TagGuardedMatcher(inner, tables, tag_markers(value))


def _run(matcher, tokenizer, max_new: int, pick) -> tuple[list[int], str]:
    """Decode as the engine does (mask, pick, accept; the end token, max_new and a terminated
    grammar finish), with `pick(allowed, out)` as the model: (output ids, finish type)."""
    eos, out = tokenizer.eos_token_id, []
    row = torch.zeros(bitmask_words(len(tokenizer)), dtype=torch.int32)
    while True:
        matcher.set_budget(max_new, len(out))
        row.zero_()
        matcher.fill_bitmask(row)
        allowed = np.flatnonzero(np.unpackbits(row.numpy().view(np.uint8), bitorder="little"))
        tok = pick(allowed, out)
        out.append(tok)
        assert matcher.accept(tok)
        if tok == eos:
            return out[:-1], "stop"
        if len(out) >= max_new:
            return out, "length"
        if matcher.is_terminated():
            return out, "stop"


def _random_model(tokenizer, seed: int):
    """Any allowed token but the end, at random (the end only when nothing else is allowed)."""
    rng, eos = random.Random(seed), tokenizer.eos_token_id

    def pick(allowed, out):
        others = [t for t in allowed.tolist() if t != eos]
        return rng.choice(others) if others else eos
    return pick


_TEXTS: dict = {}


def _texts(tokenizer) -> list[str]:
    if not _TEXTS:
        _TEXTS["list"] = [tokenizer.decode([t]) for t in range(len(tokenizer))]
    return _TEXTS["list"]


def _looping_model(tokenizer, text: str):
    """A model that writes `text` over and over: the allowed token that goes on with it longest,
    else the first allowed one that is not the end."""
    eos, vocab = tokenizer.eos_token_id, _texts(tokenizer)

    def pick(allowed, out):
        written = tokenizer.decode(out)
        want = (text * 8)[len(written):]
        best = max((t for t in allowed.tolist() if want.startswith(vocab[t]) and vocab[t]),
                   key=lambda t: len(vocab[t]), default=None)
        return best if best is not None else next((t for t in allowed.tolist() if t != eos), eos)
    return pick


@pytest.mark.parametrize("choice,parallel", [("required", None), (NAMED, None), (NAMED, False)])
@pytest.mark.parametrize("max_new", [39, 48, 128])
def test_a_random_model_still_closes_a_forced_call_within_the_budget(backend, tables, tokenizer, choice, parallel, max_new):
    m = _guarded(backend, tables, HERMES, choice, parallel)
    m.check_budget(max_new)
    out, finish = _run(m, tokenizer, max_new, _random_model(tokenizer, seed=max_new))
    assert finish == "stop" and len(out) < max_new
    _, calls = scan(tokenizer.decode(out), HERMES, partial=False)
    _valid_calls(calls)
    assert parallel is not False or len(calls) == 1
    assert choice != NAMED or {c.name for c in calls} == {"find_book"}


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
@pytest.mark.parametrize("max_new", [40, 128, 256])
def test_a_looping_model_ends_at_its_first_repeat(backend, tables, tokenizer, fmt, max_new):
    """The failing reply: the same find_book call over and over. It closes within the budget and
    ends at the first repeat; with the repeat left out one call remains."""
    m = _guarded(backend, tables, fmt, "required", None)
    m.check_budget(max_new)
    call = fmt.render("find_book", '{"title": "The Nightingale", "year": 2022}')
    out, finish = _run(m, tokenizer, max_new, _looping_model(tokenizer, call + "\n"))
    assert finish == "stop" and len(out) < max_new
    _, calls = scan(tokenizer.decode(out), fmt, partial=False)
    _valid_calls(calls)
    kept, dropped = distinct(calls)
    assert len(kept) == 1 and len(dropped) <= 1
    notes = m.finish_note().get("guard", [])
    assert ("repeat" in notes) == bool(dropped)
    if max_new >= 128:  # room for the whole call twice: written in full, and ended at the repeat
        assert json.loads(kept[0].arguments) == {"title": "The Nightingale", "year": 2022}
        assert dropped == [("find_book", 0)] and notes == ["repeat"]


@pytest.mark.parametrize("max_new", [1, 20, 38])
def test_a_budget_that_cannot_hold_a_call_is_refused(backend, tables, max_new):
    m = _guarded(backend, tables, HERMES, "required", None)
    with pytest.raises(BadRequestError, match=f"^max_tokens: {max_new} is too few .* the shortest takes 39 tokens"):
        m.check_budget(max_new)
    _guarded(backend, tables, HERMES, "auto", None).check_budget(1)  # "auto" needs no call: nothing to refuse


def test_tag_markers():
    from arborlm.runtime.constrained.tag_guard import tag_markers

    value = json.dumps(ToolContext.from_request(TOOLS, "required", None, HERMES).structural_tag())
    assert tag_markers(value)[0] == b"<tool_call>"
    regex_tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<r>"], "tags": [
        {"type": "tag", "begin": "<r>", "content": {"type": "regex", "pattern": "a+"}, "end": "</r>"}]}}
    assert tag_markers(json.dumps(regex_tag)) is None  # not JSON inside: no guard


# ---- the failing request, on the real model ------------------------------------------------------
class _TM:
    """What chat_subs needs of a TokenizerManager."""

    def __init__(self, tokenizer):
        self.tokenizer, self.context_length = tokenizer, 2048

    def apply_chat_template(self, messages, tools=None):
        from arborlm.runtime.server.tokenizer_manager import TokenizerManager

        return TokenizerManager.apply_chat_template(self, messages, tools=tools)

    def check_ids(self, ids, params, field_name="input_ids"):
        pass


def _chat(engine, tokenizer, **body):
    """One /v1/chat/completions reply built in-process: chat_subs' prompt and grammar, the
    engine's output, chat_response's message (and the same reply as a stream)."""
    from arborlm.runtime.server.openai_api import ChatCompletionRequest, _chat_delta, _Sent, chat_response, chat_subs
    from arborlm.runtime.server.tokenizer_manager import ReqState

    req = ChatCompletionRequest(model="default", messages=ASK, tools=TOOLS, temperature=0, **body)
    sub = chat_subs(req, _TM(tokenizer), HERMES)[0]
    p = sub.params
    out = engine.generate(input_ids=sub.ids, sampling_params={
        "max_new_tokens": p.max_new_tokens, "temperature": 0, "structural_tag": p.structural_tag,
        "json_schema_strict": p.json_schema_strict})
    st = ReqState("r", len(sub.ids), text=out["text"], output_ids=out["output_ids"], finished=True,
                  finish_reason=out["meta_info"]["finish_reason"])
    choice = chat_response(req, None, [sub], [st], "id", 0, "default")["choices"][0]
    sent, streamed = _Sent(), {}
    partial = ReqState("r", len(sub.ids))
    for k in range(1, len(st.text) + 1):  # the same text streamed, a character at a time
        partial.text, partial.finished = st.text[:k], k == len(st.text)
        partial.finish_reason = st.finish_reason if partial.finished else None
        for d in _chat_delta(req, sub, partial, sent)[0].get("tool_calls", []):
            streamed.setdefault(d["index"], ["", ""])
            streamed[d["index"]][0] += d["function"].get("name") or ""
            streamed[d["index"]][1] += d["function"]["arguments"]
    return choice, out, [tuple(streamed[i]) for i in sorted(streamed)]


@pytest.mark.integration
@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
@pytest.mark.parametrize("max_tokens", [40, 128])
def test_the_failing_forced_call_closes_without_repeats(engine, tokenizer, tool_choice, max_tokens):
    choice, out, streamed = _chat(engine, tokenizer, tool_choice=tool_choice, max_tokens=max_tokens)
    assert choice["finish_reason"] == "tool_calls", (choice, out["text"])
    assert out["meta_info"]["completion_tokens"] < max_tokens
    calls = choice["message"]["tool_calls"]
    _valid_calls([ToolCall(c["function"]["name"], c["function"]["arguments"], True) for c in calls])
    keys = [(c["function"]["name"], json.dumps(json.loads(c["function"]["arguments"]), sort_keys=True)) for c in calls]
    assert len(set(keys)) == len(keys)  # no two identical calls
    assert choice["json_schema_valid"] is True
    assert streamed == [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    guard = out["meta_info"]["finish_reason"].get("guard", [])
    raw = scan(out["text"], HERMES, partial=False)[1]
    assert len(raw) - len(calls) == ("repeat" in guard)  # the reply ended at its first repeat, left out
    if "repeat" in guard:  # (float32 at 128: the reply, find_book twice, 86 tokens)
        assert "a repeat of tool_calls[0] (find_book, the same arguments) was left out" in choice["finish_message"]
    assert bool(guard) == ("finish_message" in choice)


@pytest.mark.integration
def test_a_too_small_max_tokens_is_a_400_naming_it(engine, tokenizer):
    with pytest.raises(BadRequestError, match="^max_tokens: 20 is too few"):
        _chat(engine, tokenizer, tool_choice="required", max_tokens=20)
    choice, _, _ = _chat(engine, tokenizer, max_tokens=20)  # "auto" may answer in prose: no refusal
    assert choice["finish_reason"] in ("stop", "length", "tool_calls")
