"""The live server: OpenAI client and httpx against a real server process (session fixture)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.integration

GREEDY = {"temperature": 0, "max_new_tokens": 12}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=120) as c:
        yield c


def server_info(http) -> dict:
    return http.get("/get_server_info").json()["scheduler"]


def wait_pool_clean(http, timeout=30) -> dict:
    """Once every request has ended, each KV slot is free or cached and every request row is free."""
    deadline = time.time() + timeout
    while True:
        s = server_info(http)
        if s["running_requests"] == 0 and s["waiting_requests"] == 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert s["running_requests"] == 0 and s["waiting_requests"] == 0
    assert s["protected_tokens"] == 0
    assert s["free_slots"] + s["evictable_tokens"] == s["pool_size"]
    assert s["free_request_rows"] == s["max_running_requests"]
    return s


# ---- OpenAI ------------------------------------------------------------------------------------
def test_models(client, model):
    assert model == "SmolLM2-135M-Instruct"


def test_completion_matches_engine(client, model, engine):
    out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    ref = engine.generate("The capital of France is", GREEDY)
    assert out.choices[0].text == ref["text"]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]


def test_completion_batch_n_stop_logprobs(client, model):
    out = client.completions.create(model=model, prompt=["1, 2, 3,", "a b c"], max_tokens=20, temperature=0.8,
                                    n=2, seed=7, stop=[" 6"], logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert " 6" not in c.text
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs)
        assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    again = client.completions.create(model=model, prompt=["1, 2, 3,", "a b c"], max_tokens=20, temperature=0.8,
                                      n=2, seed=7, stop=[" 6"])
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: reproducible


def test_chat_uses_the_chat_template(client, model, engine):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
    ids = engine.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
    ref = engine.generate(input_ids=list(ids), sampling_params=GREEDY)
    assert out.choices[0].message.content == ref["text"]
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)


def test_chat_stream_with_usage_and_logprobs(client, model):
    msgs = [{"role": "user", "content": "Count from one to five."}]
    full = client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, logprobs=True,
                                            top_logprobs=2)
    text, lps, reasons, usage = "", [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            if ch.logprobs:
                lps += ch.logprobs.content
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    assert text == full.choices[0].message.content
    assert reasons == [full.choices[0].finish_reason]
    assert usage.completion_tokens == full.usage.completion_tokens == len(lps)
    assert all(len(e.top_logprobs) == 2 for e in lps)


def test_completion_stream_text_equals_non_stream(client, model):
    kw = dict(model=model, prompt="Once upon a time", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices) == full


def test_openai_errors(client, model):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    assert "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="hi " * 9000, max_tokens=10)
    assert "context length" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


# ---- native --------------------------------------------------------------------------------------
def test_generate_batch_and_input_ids(http, engine):
    texts = ["The sky is", "Water boils at"]
    out = http.post("/generate", json={"text": texts, "sampling_params": GREEDY}).json()
    assert [o["text"] for o in out] == [o["text"] for o in engine.generate(texts, GREEDY)]
    ids = engine.tokenizer.encode(texts[0])
    one = http.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY}).json()
    assert one["text"] == out[0]["text"]
    assert set(one["meta_info"]) >= {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens"}


def test_prefill_only_with_prompt_logprobs(http, engine):
    text = "Paris is the capital and largest city of France."
    body = {"text": text, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": 0,
            "top_logprobs_num": 2, "return_text_in_logprobs": True}
    out = http.post("/generate", json=body).json()
    ref = engine.generate(text, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    got, want = out["meta_info"]["input_token_logprobs"], ref["meta_info"]["input_token_logprobs"]
    assert out["text"] == "" and out["meta_info"]["completion_tokens"] == 0
    assert [e[1] for e in got] == [e[1] for e in want] == engine.tokenizer.encode(text)
    assert got[0][0] is None and got[0][2] == engine.tokenizer.decode([got[0][1]])
    for g, w in zip(got[1:], want[1:]):
        assert abs(g[0] - w[0]) < 1e-4
    assert all(len(t) == 2 for t in out["meta_info"]["input_top_logprobs"][1:])
    # the warmed prefix is a cache hit for the next request
    again = http.post("/generate", json={"text": text + " It", "sampling_params": {"max_new_tokens": 1}}).json()
    assert again["meta_info"]["cached_tokens"] >= len(got) - 1


def test_native_stream_is_cumulative(http):
    body = {"text": "Hello, my name is", "sampling_params": GREEDY, "stream": True}
    with http.stream("POST", "/generate", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    full = http.post("/generate", json={**body, "stream": False}).json()
    assert texts[-1] == full["text"] and chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_service_routes(http, server):
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    assert httpx.get(server.url + "/get_model_info").status_code == 401
    info = http.get("/get_model_info").json()
    assert info["is_generation"] is True and info["model_path"]
    assert http.get("/health_generate").status_code == 200
    metrics = http.get("/metrics").text
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                 "sglang:cache_hit_rate", "sglang:gen_throughput", "sglang:time_to_first_token_seconds_bucket",
                 "sglang:inter_token_latency_seconds_bucket", "sglang:generation_tokens_total"):
        assert name in metrics
    wait_pool_clean(http)
    assert http.post("/flush_cache").json() == {"success": True}
    assert server_info(http)["evictable_tokens"] == 0


def test_chat_past_its_deadline_answers_what_it_has(client, model, http):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to a thousand."}],
                                       max_tokens=2000, extra_body={"ignore_eos": True, "timeout": 0.5})
    choice = r.model_dump()["choices"][0]
    assert choice["finish_reason"] == "length" and "timed out after 0.5 s" in choice["finish_message"]
    assert 0 < r.usage.completion_tokens < 2000 and choice["message"]["content"]
    wait_pool_clean(http)


def test_abort_request_by_rid(http, server):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=60) as c:
            task = asyncio.ensure_future(c.post("/generate", json={
                "text": "Tell me a long story.", "rid": "to-abort",
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}))
            await asyncio.sleep(1.0)
            assert (await c.post("/abort_request", json={"rid": "to-abort"})).status_code == 200
            return (await task).json()

    out = asyncio.run(go())
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["completion_tokens"] < 2000
    wait_pool_clean(http)


# ---- load ----------------------------------------------------------------------------------------
PROMPTS = [f"Question {i}: what is {i} plus {i * 3}? Answer:" for i in range(64)]


def test_64_concurrent_streams_match_the_engine(server, engine, http):
    sp = {"temperature": 0, "max_new_tokens": 16}

    async def one(c, p):
        text = ""
        async with c.stream("POST", "/generate", json={"text": p, "sampling_params": sp, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text = json.loads(line[6:])["text"]
        return text

    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=300,
                                     limits=httpx.Limits(max_connections=100)) as c:
            return await asyncio.gather(*(one(c, p) for p in PROMPTS))

    got = asyncio.run(go())
    ref = [o["text"] for o in engine.generate(PROMPTS, sp)]
    assert got == ref
    wait_pool_clean(http)


def test_100_streams_cut_midway_leave_the_pool_clean(server, http):
    async def one(c, i):
        body = {"text": f"Write a long essay about topic {i}.", "stream": True,
                "sampling_params": {"max_new_tokens": 400, "ignore_eos": True, "temperature": 0.7}}
        seen = 0
        async with c.stream("POST", "/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= 2 + i % 3:
                        break  # leave mid-stream: closes the connection
        return seen

    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=300,
                                     limits=httpx.Limits(max_connections=128)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(100)))

    seen = asyncio.run(go())
    assert all(s >= 2 for s in seen)
    s = wait_pool_clean(http, timeout=60)
    assert s["running_requests"] == 0


def test_non_streaming_client_disconnect_aborts(server, http):
    body = {"text": "Tell me everything.", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, headers=HEADERS, timeout=1.5)
    wait_pool_clean(http, timeout=30)


# ---- structured generation over HTTP ----------------------------------------------------------
def test_response_format_json_schema_and_regex(client, model, http):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Invent a person as JSON."}], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    obj = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A JSON object, please."}],
                                         max_tokens=40, temperature=0, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].message.content), dict)
    r = http.post("/generate", json={"text": "My phone number is ", "sampling_params": {
        "max_new_tokens": 20, "temperature": 1.0, "regex": r"\d{3}-\d{4}"}}).json()
    import re

    assert re.fullmatch(r"\d{3}-\d{4}", r["text"])
    bad = http.post("/generate", json={"text": "x", "sampling_params": {"regex": "(unclosed"}})
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    assert http.post("/generate", json={"text": "ok", "sampling_params": {"max_new_tokens": 1}}).status_code == 200
    wait_pool_clean(http)
