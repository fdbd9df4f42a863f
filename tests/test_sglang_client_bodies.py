"""SGLang 0.5.23's unchanged frontend client against our server, as the exact requests it sends.

The fixture was captured once by running that client (`sgl.RuntimeEndpoint`) through SGLang-style
programs against a recording server: construction, flush_cache, get_server_info, gen with every
sampling field, regex and dtype gens, json_schema, select (whose scoring request carries a list of
texts), streaming, fork/join and concate_and_append, run_batch. Each is replayed here in order;
every one must succeed and answer the fields the client reads. examples/sglang_client/ runs the
client itself where sglang is installed."""

from __future__ import annotations

import json
import os
import re

import httpx
import jsonschema
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.integration

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "sglang_0.5.23_client_requests.jsonl")
REQUESTS = [json.loads(line) for line in open(FIXTURE)]


def _check_generate(req: dict, out) -> None:
    body, sp = req["body"], req["body"]["sampling_params"]
    texts = body["text"] if isinstance(body.get("text"), list) else None
    results = out if texts is not None else [out]
    if texts is not None:
        assert isinstance(out, list) and len(out) == len(texts)  # select scores one result per choice
    for r in results:
        assert isinstance(r["text"], str) and isinstance(r["output_ids"], list)
        meta = r["meta_info"]
        assert {"prompt_tokens", "completion_tokens", "finish_reason", "id"} <= set(meta)
        if body.get("return_logprob"):
            entries = meta["input_token_logprobs"]
            assert entries, "select reads the choice's prompt logprobs"
            for lp, tid, text in entries:
                assert (lp is None or isinstance(lp, float)) and isinstance(tid, int) and isinstance(text, str)
        if sp.get("max_new_tokens", 128) == 0:
            assert r["text"] == "" and meta["completion_tokens"] == 0
        if sp.get("regex") and meta["finish_reason"]["type"] != "length":
            assert re.fullmatch(sp["regex"], r["text"]), (sp["regex"], r["text"])
        if sp.get("json_schema"):  # sampled at temperature 1 within 64 tokens: it may be cut, and then says so
            if meta["finish_reason"]["type"] == "length":
                assert meta["json_schema_valid"] is False
            else:
                jsonschema.validate(json.loads(r["text"]), json.loads(sp["json_schema"]))
                assert meta["json_schema_valid"] is True
        stops = sp.get("stop") or []
        for s in [stops] if isinstance(stops, str) else stops:
            assert s not in r["text"]


def _check_stream(resp: httpx.Response) -> None:
    texts, done = [], False
    for line in resp.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        assert "error" not in event, event
        texts.append(event["text"])
    assert done and texts
    for a, b in zip(texts, texts[1:]):  # the client slices text[pos:]: each event repeats the text so far
        assert b.startswith(a)


def test_replay_sglang_client_requests(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json; charset=utf-8"}
    seen = set()
    with httpx.Client(base_url=server.url, headers=headers, timeout=300) as http:
        for req in REQUESTS:
            seen.add(req["section"])
            where = f"{req['section']}: {req['method']} {req['path']}"
            if req["body"] is not None and req["body"].get("stream"):
                with http.stream(req["method"], req["path"], json=req["body"]) as r:
                    assert r.status_code == 200, where
                    _check_stream(r)
                continue
            r = http.request(req["method"], req["path"], json=req["body"]) if req["body"] is not None else \
                http.request(req["method"], req["path"])
            assert r.status_code == 200, f"{where}: {r.text}"
            if req["path"] == "/generate":
                _check_generate(req, r.json())
            elif req["path"] == "/get_model_info":
                assert r.json()["model_path"]
            elif req["path"] == "/server_info":
                assert "scheduler" in r.json()
    assert {"select", "stream_gen", "concate_and_append", "json_schema_gen", "dtype_gen", "run_batch"} <= seen
