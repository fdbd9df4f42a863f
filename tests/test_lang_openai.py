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


# ---- chat mode: /v1/chat/completions, as for a chat-only endpoint ---------------------------------
@sgl.function
def chat_qa(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=16))


@sgl.function
def chat_pick(s):
    s += sgl.user("Is Paris the capital of France? Answer Yes or No.")
    s += sgl.assistant(sgl.select("yn", ["Yes", "No"]))


def test_chat_mode_gen_is_the_servers_chat_reply(server):
    state = chat_qa.run(question="What is the capital of France?", backend=openai_backend(server, is_chat_model=True),
                        temperature=0)
    assert state.error() is None, state.error()
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                   json={"model": "default", "max_tokens": 16, "temperature": 0, "messages": [
                       {"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": "What is the capital of France?"}]})
    assert state["answer"] == r.json()["choices"][0]["message"]["content"]
    assert state.messages()[-1] == {"role": "assistant", "content": state["answer"]}


def test_chat_mode_select_scores_with_logprobs(server):
    state = chat_pick.run(backend=openai_backend(server, is_chat_model=True))
    assert state.error() is None, state.error()
    meta = state.get_meta_info("yn")
    assert state["yn"] in ("Yes", "No")
    assert all(lps and all(lp <= 0 for lp in lps) for lps in meta["input_token_logprobs"])


def test_chat_model_refuses_gen_outside_an_assistant_turn(server):
    state = few_shot.run(question="What is the capital of France?", backend=openai_backend(server, is_chat_model=True))
    assert isinstance(state.error(), sgl.ProgramError) and "sgl.assistant" in str(state.error())


def test_chat_mode_streams(server):
    backend = openai_backend(server, is_chat_model=True)
    state = chat_qa.run(question="Name a colour.", backend=backend, temperature=0, stream=True)
    streamed = "".join(state.text_iter("answer"))
    final = chat_qa.run(question="Name a colour.", backend=backend, temperature=0)
    assert streamed == final["answer"] and streamed
