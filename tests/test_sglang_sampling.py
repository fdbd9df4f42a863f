"""SGLang's sampling fields on a model: stop_regex (trimmed, kept with no_stop_trim, never shown
then taken back by a stream), logit_bias, sampling_seed, on the in-process Engine (tiny model) and
the server (real model)."""

from __future__ import annotations

import json

import httpx
import pytest
import regex

from conftest import API_KEY, assert_pool_clean

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


def _stop_regex_for(text: str) -> tuple[str, int, str]:
    """A regex matching a 3-character piece from the middle of `text`, where it first matches and the match."""
    for i in range(len(text) // 3, len(text) - 3):
        piece = text[i : i + 3]
        if piece.strip() and "\ufffd" not in piece:
            return regex.escape(piece), text.find(piece), piece
    pytest.skip(f"no usable piece in {text!r}")


def test_engine_stop_regex_trims_streams_and_no_stop_trim(tiny_engine):
    prompt = "The list of numbers is"
    full = tiny_engine.generate(prompt, GREEDY)["text"]
    pattern, at, piece = _stop_regex_for(full)
    out = tiny_engine.generate(prompt, {**GREEDY, "stop_regex": pattern})
    assert out["text"] == full[:at]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": piece}
    kept = tiny_engine.generate(prompt, {**GREEDY, "stop_regex": [pattern], "no_stop_trim": True})["text"]
    assert kept.startswith(full[: at + 3]) and full.startswith(kept)
    streamed = "".join(c["text"] for c in tiny_engine.generate(prompt, {**GREEDY, "stop_regex": pattern}, stream=True))
    assert streamed == full[:at]  # a chunk that showed part of the match could not be taken back
    # a stop string held back the same way
    streamed = "".join(c["text"] for c in tiny_engine.generate(prompt, {**GREEDY, "stop": piece}, stream=True))
    assert streamed == full[:at]
    assert_pool_clean(tiny_engine)


def test_engine_logit_bias_and_sampling_seed(tiny_engine):
    base = tiny_engine.generate("Hello", {**GREEDY, "max_new_tokens": 6})
    forced = tiny_engine.generate("Hello", {**GREEDY, "max_new_tokens": 6, "logit_bias": {"42": 100}})
    assert forced["output_ids"] == [42] * 6
    first = base["output_ids"][0]
    banned = tiny_engine.generate("Hello", {**GREEDY, "max_new_tokens": 1, "logit_bias": {str(first): -100}})
    assert banned["output_ids"][0] != first
    a = tiny_engine.generate("Hello", {"temperature": 1.0, "max_new_tokens": 8, "sampling_seed": 5})
    b = tiny_engine.generate("Hello", {"temperature": 1.0, "max_new_tokens": 8, "seed": 5})
    assert a["output_ids"] == b["output_ids"]


# ---- the server, with the request bodies SGLang's client sends -----------------------------------
@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def _sse_texts(r: httpx.Response) -> list[str]:
    out = []
    for line in r.iter_lines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            out.append(json.loads(line[5:])["text"])
    return out


@pytest.mark.integration
def test_server_stop_regex_and_stream(http):
    body = {"text": "Count: 1, 2, 3,", "sampling_params": {**GREEDY}}
    full = http.post("/generate", json=body).json()["text"]
    pattern, at, piece = _stop_regex_for(full)
    sp = {**GREEDY, "stop_regex": pattern}
    out = http.post("/generate", json={**body, "sampling_params": sp}).json()
    assert out["text"] == full[:at] and out["meta_info"]["finish_reason"]["matched"] == piece
    with http.stream("POST", "/generate", json={**body, "sampling_params": sp, "stream": True}) as r:
        texts = _sse_texts(r)
    # native streams carry the text so far in each chunk (SGLang's format): never longer than the end
    assert texts[-1] == full[:at] and all(full[:at].startswith(t) for t in texts)


@pytest.mark.integration
def test_server_logit_bias_native_and_openai(http, server):
    out = http.post("/generate", json={"text": "Hi", "sampling_params": {**GREEDY, "max_new_tokens": 4,
                                                                          "logit_bias": {"42": 100}}}).json()
    assert out["output_ids"] == [42] * 4
    r = http.post("/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 3, "temperature": 0,
                                           "logit_bias": {"42": 100}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
