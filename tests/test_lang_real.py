"""Programs on the real model through both backends: chat, few-shot with stop, select, fork/join,
run_batch, streaming."""

from __future__ import annotations

import asyncio

import pytest

import arborlm.lang as sgl
from arborlm.lang.backend.base import GenerateCall

from lang_backends import backend  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
GREEDY = {"temperature": 0}


def direct(backend, text, **sampling):
    return asyncio.run(backend.generate(GenerateCall(text=text, sampling_params=sampling)))["text"]


@sgl.function
def multi_turn(s, q1, q2):
    s += sgl.system("You are a terse assistant.")
    s += sgl.user(q1)
    s += sgl.assistant(sgl.gen("a1", max_tokens=12))
    s += sgl.user(q2)
    s += sgl.assistant(sgl.gen("a2", max_tokens=12))


def test_multi_turn_chat_uses_the_model_template(backend, tokenizer):
    state = multi_turn.run(q1="What is 2+2?", q2="And 3+3?", backend=backend, **GREEDY)
    assert state.error() is None
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == state["a1"] and msgs[4]["content"] == state["a2"] and state["a1"].strip()
    assert state.text() == tokenizer.apply_chat_template(msgs, tokenize=False)
    prompt = tokenizer.apply_chat_template(msgs[:1] + msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert state["a1"] == direct(backend, prompt, max_new_tokens=12, temperature=0)


@sgl.function
def few_shot(s, question):
    s += "Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of Spain?\nA: Madrid\n"
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=16, stop="\n")


def test_few_shot_with_stop(backend):
    state = few_shot.run(question="What is the capital of France?", backend=backend, **GREEDY)
    answer = state["answer"]
    assert "\n" not in answer and "Paris" in answer
    prompt = state.text()[: -len(answer)]
    assert answer == direct(backend, prompt, max_new_tokens=16, stop="\n", temperature=0)
    assert state.get_meta_info("answer")["finish_reason"]["type"] == "stop"


@sgl.function
def capital(s, method):
    s += "The capital of France is " + sgl.select("city", ["Paris", "London", "a small village"], choices_method=method)


def reference_choice(backend, prefix, choices):
    """Mean logprob of each choice scored from scratch (whole-prompt logprobs, no cache involved)."""
    ids = asyncio.run(backend.tokenize([prefix] + [prefix + c for c in choices]))
    scores = []
    for full in ids[1:]:
        k = next(i for i, (a, b) in enumerate(zip(ids[0] + [-1], full)) if a != b)
        out = asyncio.run(backend.generate(GenerateCall(input_ids=full, sampling_params={"max_new_tokens": 0},
                                                        return_logprob=True, logprob_start_len=0)))
        lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][k:]]
        scores.append(sum(lps) / len(lps))
    return choices[max(range(len(choices)), key=scores.__getitem__)], scores


def test_select_matches_reference_scores(backend):
    choices = ["Paris", "London", "a small village"]
    ref, scores = reference_choice(backend, "The capital of France is ", choices)
    picks = [capital.run(method=sgl.token_length_normalized, backend=backend) for _ in range(2)]
    assert [p["city"] for p in picks] == [ref, ref] and ref == "Paris"
    got = picks[0].get_meta_info("city")["normalized_prompt_logprobs"]
    assert got == pytest.approx(scores, abs=1e-3)
    for method in (sgl.greedy_token_selection, sgl.unconditional_likelihood_normalized):
        assert capital.run(method=method, backend=backend)["city"] in choices


@sgl.function
def branches(s):
    s += "List three colours.\n"
    forks = s.fork(3)
    forks += lambda i: f"Colour {i + 1}:" + sgl.gen("colour", max_tokens=4, stop="\n")
    forks.join()


def test_fork_join_gathers_variables_and_hits_the_cache(backend):
    state = branches.run(backend=backend, **GREEDY)
    colours = state["colour"]
    assert isinstance(colours, list) and len(colours) == 3 and all(isinstance(c, str) for c in colours)
    metas = state.get_meta_info("colour")
    assert all(m["cached_tokens"] >= 4 for m in metas)  # the warmed prefix "List three colours.\n"


def test_run_batch_of_16_with_progress_bar(backend, capsys):
    questions = [f"What is {i} plus {i}?" for i in range(16)]
    states = few_shot.run_batch([{"question": q} for q in questions], backend=backend, max_new_tokens=8, **GREEDY)
    assert len(states) == 16 and all(s.error() is None for s in states)
    assert all("\n" not in s["answer"] for s in states)
    assert "16/16" in capsys.readouterr().err


@sgl.function
def story(s):
    s += sgl.user("Tell me a story about a cat.")
    s += sgl.assistant(sgl.gen("story", max_tokens=16))


def test_streaming_sync_and_async(backend):
    state = story.run(backend=backend, stream=True, **GREEDY)
    chunks = list(state.text_iter("story"))
    assert len(chunks) > 1 and "".join(chunks) == state["story"]

    async def main():
        st = await story.arun(backend=backend, stream=True, **GREEDY)
        return [c async for c in st.text_async_iter("story")], await st.get_var_async("story")

    chunks, final = asyncio.run(main())
    assert len(chunks) > 1 and "".join(chunks) == final == state["story"]


def test_backend_error_names_the_variable(backend):
    @sgl.function
    def bad(s):
        s += "x" + sgl.gen("y", max_tokens=-1)

    err = bad.run(backend=backend).error()
    assert isinstance(err, sgl.ProgramError) and "variable 'y'" in str(err) and "max_new_tokens" in str(err)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}]


@sgl.function
def weather_agent(s, question):
    s += sgl.system(sgl.tools_prompt(TOOLS))
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("call", tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=40))


def test_gen_with_tools_makes_a_valid_call(backend):
    import json

    state = weather_agent.run(question="What's the weather in Oslo?", backend=backend, temperature=0)
    assert state.error() is None
    meta = state.get_meta_info("call")
    assert meta["json_schema_valid"] is True and len(meta["tool_calls"]) == 1
    call = meta["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and isinstance(json.loads(call["arguments"])["city"], str)
    assert state["call"].startswith("<tool_call>") and meta["content"] == ""
    with pytest.raises(ValueError, match="tool_choice"):
        sgl.gen("x", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
