"""Bad input gets a 4xx with an OpenAI-style error body, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.integration

M = "SmolLM2-135M-Instruct"
CHAT = {"model": M, "messages": [{"role": "user", "content": "hi"}]}
LONG = "hello " * 9000

# (name, method, path, body: dict | raw bytes | None, headers, expected status)
CASES = [
    ("invalid json", "/generate", b"{not json", 400),
    ("body not an object", "/generate", b"[1, 2]", 400),
    ("neither text nor ids", "/generate", {"sampling_params": {}}, 400),
    ("both text and ids", "/generate", {"text": "a", "input_ids": [1]}, 400),
    ("unknown top-level field", "/generate", {"text": "a", "bogus": 1}, 400),
    ("unknown sampling param", "/generate", {"text": "a", "sampling_params": {"tempurature": 1}}, 400),
    ("text of wrong type", "/generate", {"text": 5}, 400),
    ("negative max_new_tokens", "/generate", {"text": "a", "sampling_params": {"max_new_tokens": -1}}, 400),
    ("temperature as a string", "/generate", {"text": "a", "sampling_params": {"temperature": "hot"}}, 400),
    ("top_p out of range", "/generate", {"text": "a", "sampling_params": {"top_p": 1.5}}, 400),
    ("token id out of vocab", "/generate", {"input_ids": [1, 10**9]}, 400),
    ("empty prompt", "/generate", {"input_ids": []}, 400),
    ("prompt over context", "/generate", {"text": LONG}, 400),
    ("sampling_params list length", "/generate", {"text": ["a", "b"], "sampling_params": [{}]}, 400),
    ("bad logprob_start_len", "/generate", {"text": "a", "return_logprob": True, "logprob_start_len": -5}, 400),
    ("two grammars at once", "/generate", {"text": "a", "sampling_params": {"regex": "a+", "ebnf": "root ::= \"a\""}}, 400),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404),
    ("missing model", "/v1/completions", {"prompt": "a"}, 400),
    ("missing messages", "/v1/chat/completions", {"model": M}, 400),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400),
    ("bad role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("negative max_tokens", "/v1/completions", {"model": M, "prompt": "a", "max_tokens": -3}, 400),
    ("max_tokens as a string", "/v1/completions", {"model": M, "prompt": "a", "max_tokens": "many"}, 400),
    ("temperature too high", "/v1/chat/completions", {**CHAT, "temperature": 5}, 400),
    ("n = 0", "/v1/chat/completions", {**CHAT, "n": 0}, 400),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"parameters": {}}}]}, 400),
    ("tool_choice", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                                             "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400),
    ("logit_bias key not a token id", "/v1/completions", {"model": M, "prompt": "a", "logit_bias": {"x": 5}}, 400),
    ("logit_bias id outside the vocab", "/generate", {"text": "a", "sampling_params": {"logit_bias": {"99999999": 5}}}, 400),
    ("logit_bias over 100", "/generate", {"text": "a", "sampling_params": {"logit_bias": {"1": 500}}}, 400),
    ("bad stop_regex", "/generate", {"text": "a", "sampling_params": {"stop_regex": "(unclosed"}}, 400),
    ("structural_tag", "/generate", {"text": "a", "sampling_params": {"structural_tag": "{}"}}, 400),
    ("image_data", "/generate", {"text": "a", "image_data": "http://x/y.png"}, 400),
    ("lora_path", "/generate", {"text": "a", "lora_path": "adapter"}, 400),
    ("custom_logit_processor", "/generate", {"text": "a", "custom_logit_processor": "gASV"}, 400),
    ("unknown top-level field", "/generate", {"text": "a", "no_such_field": 1}, 400),
    ("empty prompt list", "/v1/completions", {"model": M, "prompt": []}, 400),
    ("chat prompt over context", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONG}]}, 400),
    ("bad response_format type", "/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400),
    ("json_schema without schema", "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400),
    ("unknown route", "/v2/nothing", {}, 404),
    ("abort without rid", "/abort_request", {}, 400),
]


@pytest.mark.parametrize("name,path,body,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_4xx_and_server_keeps_serving(server, name, path, body, status):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers=headers, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and set(err) == {"message", "type", "param", "code"}
    ok = httpx.post(server.url + "/generate", headers=headers, timeout=60,
                    json={"text": "ok", "sampling_params": {"max_new_tokens": 1}})
    assert ok.status_code == 200


def test_oversized_body_is_413(server):
    r = httpx.post(server.url + "/generate", headers={"Authorization": f"Bearer {API_KEY}"},
                   content=b'{"text": "' + b"a" * (9 << 20) + b'"}', timeout=60)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]


def test_missing_api_key_is_401(server):
    r = httpx.post(server.url + "/generate", json={"text": "a"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
