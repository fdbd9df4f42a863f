"""The OpenAI-compatible backend against our own server's /v1/completions."""

from __future__ import annotations

import pytest

import arborlm.lang as sgl
from arborlm.lang.backend.runtime_endpoint import RuntimeEndpoint

from conftest import API_KEY

pytestmark = pytest.mark.integration


@sgl.function
def few_shot(s, question):
    s += "Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of Spain?\nA: Madrid\n"
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=16, stop="\n")


@sgl.function
def capital(s):
    s += "The capital of France is " + sgl.select("city", ["Paris", "London", "a small village"])


def openai_backend(server, **kw):
    return sgl.OpenAI("SmolLM2-135M-Instruct", base_url=server.url + "/v1", api_key=API_KEY, **kw)


def test_gen_matches_the_native_backend(server):
    native = few_shot.run(question="What is the capital of France?", backend=RuntimeEndpoint(server.url, API_KEY),
                          temperature=0)
    via_openai = few_shot.run(question="What is the capital of France?", backend=openai_backend(server), temperature=0)
    assert via_openai.error() is None
    assert via_openai["answer"] == native["answer"] and "Paris" in via_openai["answer"]


def test_select_through_echo_logprobs(server, real_model_dir):
    native = capital.run(backend=RuntimeEndpoint(server.url, API_KEY))
    state = capital.run(backend=openai_backend(server, tokenizer_path=real_model_dir))
    assert state.error() is None
    assert state["city"] == native["city"] == "Paris"
    ours, theirs = state.get_meta_info("city")["scores"], native.get_meta_info("city")["scores"]
    assert all(abs(a - b) < 1e-3 for a, b in zip(ours, theirs))


def test_select_without_a_tokenizer_is_a_clear_error(server):
    state = capital.run(backend=openai_backend(server))
    assert isinstance(state.error(), sgl.ProgramError)
    assert "tokenizer_path" in str(state.error()) and "city" in str(state.error())
