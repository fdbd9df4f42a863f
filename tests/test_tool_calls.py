"""Tool calling: the parser and stream deltas of each format, the request's tools and prompt, the
grammar against the real tokenizer, and the official `openai` client against the live server."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from arborlm.runtime.constrained.base import GrammarSpec
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.tool_calls import FORMATS, ToolCallStream, ToolContext, pick_format, scan
from arborlm.runtime.tool_calls.request import prompt_messages

HERMES, LLAMA3, MISTRAL = FORMATS["hermes"], FORMATS["llama3"], FORMATS["mistral"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
HERMES_TEXT = ('Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


# ---- parsing (no model) --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,text,content,calls", [
    (HERMES, HERMES_TEXT, "Sure.", [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]),
    (LLAMA3, '{"name": "f", "parameters": {"a": [1, 2]}}; {"name": "g", "parameters": {}}', "",
     [("f", '{"a": [1, 2]}'), ("g", "{}")]),
    (MISTRAL, '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": "]"}}]', "",
     [("f", '{"a": 1}'), ("g", '{"b": "]"}')]),
    (HERMES, "hello <tool_call> not a call", "hello <tool_call> not a call", []),
    (HERMES, 'cut <tool_call>\n{"name": "f", "arguments": {"a": ', 'cut <tool_call>\n{"name": "f", "arguments": {"a": ', []),
    (HERMES, '<tool_call>{"name":"f","arguments":{"x":"</tool_call>"}}</tool_call>', "", [("f", '{"x":"</tool_call>"}')]),
])
def test_scan_finished_text(fmt, text, content, calls):
    got_content, got = scan(text, fmt, partial=False)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert all(c.complete and json.loads(c.arguments) is not None for c in got)


@pytest.mark.parametrize("fmt,text", [
    (HERMES, HERMES_TEXT),
    (MISTRAL, 'Calling.[TOOL_CALLS][{"name": "f", "arguments": {"a": "x,y"}}, {"name": "g", "arguments": {}}]'),
    (LLAMA3, 'Note {not a call} then {"name": "f", "parameters": {"q": "{\\"n\\": 1}"}}'),
    (HERMES, "plain text, with a < sign and <tool but no call"),
])
def test_stream_deltas_add_up_to_the_finished_parse(fmt, text):
    """Fed one character at a time, the deltas concatenate to exactly what the final parse says."""
    stream, content, args, names = ToolCallStream(fmt), "", {}, {}
    for k in range(1, len(text) + 1):
        delta = stream.feed(text[:k], finished=k == len(text))
        content += delta.get("content", "")
        for piece in delta.get("tool_calls", []):
            if "id" in piece:
                assert piece["index"] == len(names) and piece["function"]["arguments"] == ""
                names[piece["index"]] = piece["function"]["name"]
            args[piece["index"]] = args.get(piece["index"], "") + piece["function"]["arguments"]
    want_content, want = scan(text, fmt, partial=False)
    assert content == want_content
    assert [(names[i], args[i]) for i in sorted(names)] == [(c.name, c.arguments) for c in want]


def test_pick_format_reads_the_chat_template():
    assert pick_format("auto", None) is HERMES
    assert pick_format("auto", "{{ '[TOOL_CALLS]' }}") is MISTRAL
    assert pick_format("auto", "<|python_tag|>{{ x }}") is LLAMA3
    assert pick_format("llama3", "anything") is LLAMA3
    with pytest.raises(ValueError, match="tool_call_parser"):
        pick_format("nope", None)


def test_tool_context_choices_and_errors():
    ctx = ToolContext.from_request(TOOLS, None, None, HERMES)
    assert ctx.choice == "auto" and ctx.parallel and [t.name for t in ctx.tools] == ["get_weather", "get_time"]
    forced = ToolContext.from_request(TOOLS, {"type": "function", "function": {"name": "get_time"}}, False, HERMES)
    assert forced.choice == "forced" and [t.name for t in forced.tools] == ["get_time"] and len(forced.offered) == 2
    assert ToolContext.from_request(TOOLS, "none", None, HERMES) is None
    assert ToolContext.from_request(None, None, None, HERMES) is None
    for tools, choice, field in [
        (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
        (None, "required", "tool_choice"),
        ([{"type": "code_interpreter"}], None, "tools.0.type"),
        ([{"type": "function", "function": {"description": "no name"}}], None, "tools.0.function.name"),
        ([WEATHER, WEATHER], None, "tools"),
    ]:
        with pytest.raises(BadRequestError, match=f"^{field}"):
            ToolContext.from_request(tools, choice, None, HERMES)


def test_default_prompt_renders_tools_calls_and_results():
    ctx = ToolContext.from_request(TOOLS, "auto", None, HERMES)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'},
            {"role": "tool", "tool_call_id": "c2", "content": "sunny"}]
    out = prompt_messages(msgs, HERMES, ctx, native=False)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "get_time"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert out[3]["content"] == '<tool_response>\n{"temp": 18}\n</tool_response>\n<tool_response>\nsunny\n</tool_response>'
    native = prompt_messages(msgs, HERMES, ctx, native=True)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # templates take objects


# ---- the grammar, on the real tokenizer ----------------------------------------------------------
@pytest.fixture(scope="module")
def xgrammar_backend(tokenizer):
    from arborlm.runtime.constrained.xgrammar_backend import XGrammarBackend

    return XGrammarBackend(tokenizer, tokenizer.eos_token_id, len(tokenizer))


def _walk(matcher, tokenizer, text) -> bool:
    return all(matcher.accept(t) for t in tokenizer.encode(text))


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL])
def test_structural_tag_enforces_calls(xgrammar_backend, tokenizer, fmt):
    def grammar(choice, parallel=True):
        ctx = ToolContext.from_request(TOOLS, choice, parallel, fmt)
        return xgrammar_backend.compile(GrammarSpec("structural_tag", json.dumps(ctx.structural_tag()), strict=False))

    good = fmt.render("get_weather", '{"city": "Paris"}')
    bad_args = fmt.render("get_weather", '{"town": "Paris"}')
    bad_name = fmt.render("get_news", '{"city": "Paris"}')
    auto, required = grammar("auto"), grammar("required")
    assert _walk(auto.matcher(), tokenizer, "Hello there")  # auto: text is fine
    assert not _walk(required.matcher(), tokenizer, "Hello there")  # required: a call comes first
    for g in (auto, required):
        m = g.matcher()
        assert _walk(m, tokenizer, good)
        assert not _walk(m, tokenizer, " and some prose")  # after a call, only calls or the end
        assert not _walk(g.matcher(), tokenizer, bad_args) and not _walk(g.matcher(), tokenizer, bad_name)
    one = grammar({"type": "function", "function": {"name": "get_time"}}, parallel=False).matcher()
    assert not _walk(one, tokenizer, fmt.trigger + ' {"name": "get_weather"')
    m = grammar({"type": "function", "function": {"name": "get_time"}}, parallel=False).matcher()
    assert _walk(m, tokenizer, fmt.render("get_time", '{"city": "Rome"}')) and m.is_terminated()


def test_sglang_structural_tag_form(xgrammar_backend, tokenizer):
    """SGLang's own spelling (structures + triggers) compiles, and its schemas are prepared like
    json_schema's (the annotation `x-order` is dropped, not refused)."""
    tag = {"type": "structural_tag", "triggers": ["<function="], "structures": [
        {"begin": "<function=add>", "end": "</function>",
         "schema": {"type": "object", "properties": {"a": {"type": "integer", "x-order": 1}}, "required": ["a"]}}]}
    m = xgrammar_backend.compile(GrammarSpec("structural_tag", json.dumps(tag), strict=False)).matcher()
    assert _walk(m, tokenizer, 'Sum: <function=add>{"a": 2}</function>')


# ---- the live server, with the official openai client ---------------------------------------------
@pytest.fixture(scope="module")
def client(server):
    from conftest import API_KEY

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


ASK = [{"role": "user", "content": "What is the weather like in Paris and what time is it there?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _check_calls(calls):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.integration
def test_openai_required_named_and_parallel(client):
    out = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                         temperature=0, max_tokens=120)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.json_schema_valid is True
    _check_calls(choice.message.tool_calls)
    named = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    _check_calls(named.choices[0].message.tool_calls)
    assert {c.function.name for c in named.choices[0].message.tool_calls} == {"get_time"}
    single = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, temperature=0, max_tokens=120)
    assert single.choices[0].finish_reason == "tool_calls" and len(single.choices[0].message.tool_calls) == 1


@pytest.mark.integration
def test_openai_auto_and_none(client):
    auto = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=24)
    msg = auto.choices[0].message
    assert msg.tool_calls or msg.content  # the model chooses; a call it makes is well-formed
    if msg.tool_calls:
        _check_calls(msg.tool_calls)
    none = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


@pytest.mark.integration
def test_openai_streamed_tool_calls_match_the_response(client):
    kwargs = dict(model="default", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls, reasons = {}, []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        for d in choice.delta.tool_calls or []:
            if d.id:
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
    assert reasons[-1] == "tool_calls" and all(r is None for r in reasons[:-1])
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]


@pytest.mark.integration
def test_openai_tool_result_turn(client):
    first = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18, "sky": "clear"})}]
    out = client.chat.completions.create(model="default", messages=history, tools=[WEATHER], temperature=0, max_tokens=16)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert out.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


@pytest.mark.integration
def test_openai_tool_errors(client):
    for kwargs, field in [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=TOOLS, response_format={"type": "json_object"}), "response_format"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}, "strict": True}}],
              tool_choice="required"), "not"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="default", messages=ASK, max_tokens=8, **kwargs)
        assert field in e.value.body["message"]


@pytest.mark.integration
def test_tool_requests_leave_the_pool_clean(server, client):
    """After tool requests end (a stream cut after its first call delta included), every KV slot
    is free or cached."""
    import httpx

    from conftest import API_KEY
    from test_server import wait_pool_clean

    stream = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=120, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.tool_calls:
            break
    stream.close()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        wait_pool_clean(http)
