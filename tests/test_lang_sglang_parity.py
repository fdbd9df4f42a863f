"""arborlm.lang against SGLang 0.5's frontend: every public name exists, SGLang-only features
refuse clearly, and SGLang-style programs (fork item +=, typed gen, stop_regex, n, flush_cache)
run on both real-model backends."""

from __future__ import annotations

import re

import pytest

import arborlm.lang as sgl
from arborlm.lang import ir

from lang_backends import backend  # noqa: F401 - fixture

# sglang/__init__.py __all__ and sglang/lang/api.py of the sglang 0.5.23 wheel
SGLANG_ALL = [
    "Anthropic", "Crusoe", "Engine", "LiteLLM", "OpenAI", "Runtime", "RuntimeEndpoint", "ServerArgs", "VertexAI",
    "assistant", "assistant_begin", "assistant_end", "flush_cache", "function", "gen", "gen_int", "gen_string",
    "get_server_info", "global_config", "greedy_token_selection", "image", "select", "separate_reasoning",
    "set_default_backend", "system", "system_begin", "system_end", "token_length_normalized",
    "unconditional_likelihood_normalized", "user", "user_begin", "user_end", "video",
]
NOT_PROVIDED = {"Anthropic", "Crusoe", "LiteLLM", "VertexAI"}
# sglang/lang/ir.py
SGLANG_REGEX = {"REGEX_INT": r"[-+]?[0-9]+[ \n]*", "REGEX_FLOAT": r"[-+]?[0-9]*\.?[0-9]+[ \n]*",
                "REGEX_BOOL": r"(True|False)", "REGEX_STR": r"\"[\w\d\s]*\""}
GREEDY = {"temperature": 0}


@pytest.mark.parametrize("name", SGLANG_ALL)
def test_every_sglang_frontend_name_exists(name):
    if name in NOT_PROVIDED:
        with pytest.raises(NotImplementedError, match="not provided"):
            getattr(sgl, name)
    else:
        assert getattr(sgl, name) is not None


def test_regex_constants_are_sglangs():
    for name, value in SGLANG_REGEX.items():
        assert getattr(ir, name) == value


def test_gen_signature_and_dtype_regexes():
    for dtype, name in ((int, "REGEX_INT"), ("float", "REGEX_FLOAT"), (bool, "REGEX_BOOL"), (str, "REGEX_STR")):
        assert sgl.gen("x", dtype=dtype).params.regex == SGLANG_REGEX[name]
    g = sgl.gen("x", 8, 1, 2, "\n", [3], r"\d", 0.5)  # SGLang's positional order: max, min, n, stop, ids, regex, temp
    p = g.params
    assert (p.max_new_tokens, p.min_new_tokens, p.n, p.stop, p.stop_token_ids, p.stop_regex, p.temperature) == (
        8, 1, 2, "\n", [3], r"\d", 0.5)
    with pytest.warns(UserWarning, match="dtype is used"):
        assert sgl.gen("x", dtype=int, regex="a+").params.regex == SGLANG_REGEX["REGEX_INT"]
    with pytest.raises(TypeError, match="dtype"):
        sgl.gen("x", dtype=list)
    with pytest.raises(re.error):
        sgl.gen("x", regex="(")
    assert sgl.gen_int("x").params.regex == SGLANG_REGEX["REGEX_INT"]
    assert sgl.gen_string("x").params.regex == SGLANG_REGEX["REGEX_STR"]
    assert isinstance(sgl.gen("x", choices=["a", "b"]), ir.Select)


def test_what_is_not_supported_says_so():
    with pytest.raises(NotImplementedError, match="not supported by this model"):
        sgl.image("cat.png")
    with pytest.raises(NotImplementedError, match="not supported by this model"):
        sgl.video("cat.mp4", 4)
    with pytest.raises(NotImplementedError, match="num_api_spec_tokens"):
        @sgl.function(num_api_spec_tokens=64)
        def spec(s):
            s += sgl.gen("x")
    with pytest.raises(NotImplementedError, match="skip_special_tokens_in_output"):
        sgl.global_config.skip_special_tokens_in_output = False
    sgl.global_config.enable_precache_with_tracing = False  # an interpreter tuning knob: accepted
    sgl.global_config.enable_precache_with_tracing = True


def test_no_default_backend_answers_like_sglang(monkeypatch):
    from arborlm.lang import backend as _backend

    monkeypatch.setattr(_backend, "_default", None)
    assert sgl.flush_cache() is False and sgl.get_server_info() is None


@sgl.function
def parallel_answers(s, question):
    s += "Question: " + question + "\n"
    forks = s.fork(2)
    for i in range(2):
        forks[i] += f"Answer {i + 1}:" + sgl.gen("answer", max_tokens=8, stop="\n")
    forks.join()


@sgl.function
def typed(s):
    s += "Q: How many legs does a cat have? A (a number): " + sgl.gen("legs", dtype=int, max_tokens=4) + "\n"
    s += "Q: What is 1.5 plus 2? A: " + sgl.gen("sum", dtype=float, max_tokens=6) + "\n"
    s += "Q: Is the sky blue? A (True or False): " + sgl.gen("blue", dtype=bool, max_tokens=3) + "\n"
    s += "Q: Name a colour. A: " + sgl.gen_string("colour", max_tokens=8) + "\n"


def test_fork_item_plus_equals(backend):
    state = parallel_answers.run(question="What is the capital of France?", backend=backend, **GREEDY)
    answers = state["answer"]
    assert isinstance(answers, list) and len(answers) == 2
    assert all("\n" not in a for a in answers)


def test_typed_gen(backend):
    state = typed.run(backend=backend, **GREEDY)
    assert re.fullmatch(SGLANG_REGEX["REGEX_INT"], state["legs"])
    assert re.fullmatch(SGLANG_REGEX["REGEX_FLOAT"], state["sum"])
    assert state["blue"] in ("True", "False")
    assert re.fullmatch(SGLANG_REGEX["REGEX_STR"], state["colour"])
    assert isinstance(state.get_var("legs", parsed=True), int)
    assert isinstance(state.get_var("sum", parsed=True), float)
    assert isinstance(state.get_var("blue", parsed=True), bool)


@sgl.function
def stop_at_regex(s):
    s += "Count from one: 1, 2, 3," + sgl.gen("rest", max_tokens=24, stop_regex=r"\b7\b", ignore_eos=True)


@sgl.function
def samples(s):
    s += "A random fruit:" + sgl.gen("fruit", max_tokens=4, n=3, temperature=1.0)


def test_stop_regex_n_and_service_calls(backend):
    state = stop_at_regex.run(backend=backend, **GREEDY)
    assert "7" not in state["rest"]
    state = samples.run(backend=backend)
    assert isinstance(state["fruit"], list) and len(state["fruit"]) == 3
    assert state.text().startswith("A random fruit:" + state["fruit"][0])
    assert sgl.flush_cache(backend) in (True, False)
    info = sgl.get_server_info(backend)
    assert "scheduler" in info


@sgl.function
def count_then_set(s):
    s += "Two plus two is " + sgl.gen("n", dtype=int, max_tokens=3)


@sgl.function
def streamed_answer(s):
    s += sgl.user("Name three colours.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=12, return_logprob=True))


def test_setitem_and_stream_meta_data(backend):
    import asyncio

    state = count_then_set.run(backend=backend, **GREEDY)
    state["n"] = int(state["n"])  # SGLang's set_var, as its dtype_gen program does
    assert isinstance(state["n"], int)

    async def collect():
        st = streamed_answer.run(backend=backend, stream=True, **GREEDY)
        return [c async for c in st.text_async_iter("answer", return_meta_data=True)]

    chunks = asyncio.run(collect())
    seen = 0
    for text, meta in chunks:  # SGLang's test_stream_logprobs contract
        assert text and meta["completion_tokens"] == meta["output_token_logprobs_length"]
        assert len(meta["output_token_logprobs"]) == meta["output_token_logprobs_length"] - seen
        seen = meta["output_token_logprobs_length"]
    assert seen == 12
