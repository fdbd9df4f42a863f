"""The interpreter against a scripted fake backend: the exact requests a program sends, errors,
streaming and the choices methods, without a model."""

from __future__ import annotations

import asyncio

import pytest

import arborlm.lang as sgl
from arborlm.lang.backend.base import Backend, BackendError, ModelInfo

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class FakeBackend(Backend):
    """Tokens are characters; a gen's reply is `reply(prompt)`; a scored token's logprob is -1 for
    characters in `liked` and -2 otherwise."""

    def __init__(self, reply=lambda prompt: "ok", liked: str = "", delay: float = 0.0):
        self.reply, self.liked, self.delay = reply, liked, delay
        self.calls: list[dict] = []

    def _one(self, call, ids):
        text = "" if call.sampling_params.get("max_new_tokens") == 0 else self.reply(call.text)
        if isinstance(text, Exception):
            raise text
        meta = {"prompt_tokens": len(ids), "cached_tokens": 0}
        if call.return_logprob:
            start = max(call.logprob_start_len, 0)
            meta["input_token_logprobs"] = [[None if j == 0 else -1.0 if chr(t) in self.liked else -2.0, t, None]
                                            for j, t in enumerate(ids) if j >= start]
        return {"text": text, "meta_info": meta}

    async def generate(self, call):
        self.calls.append(call.body())
        await asyncio.sleep(self.delay)
        if call.input_ids is not None and call.input_ids and isinstance(call.input_ids[0], list):
            return [self._one(call, ids) for ids in call.input_ids]
        return self._one(call, call.input_ids if call.text is None else [ord(c) for c in call.text])

    async def generate_stream(self, call):
        self.calls.append(call.body())
        text = self.reply(call.text)
        for i in range(0, len(text), 2):
            await asyncio.sleep(self.delay)
            yield {"text": text[i:i + 2], "meta_info": {"completion_tokens": i}}

    async def tokenize(self, texts):
        return [[ord(c) for c in t] for t in texts]

    async def model_info(self):
        return ModelInfo(CHATML, None, "<|im_end|>")


def ids(text):
    return [ord(c) for c in text]


@sgl.function
def chat_fork_select(s, question):
    s += sgl.system("Be brief.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=8, stop="\n"))
    forks = s.fork(2)
    forks += lambda i: f"Idea {i}: " + sgl.gen("idea", max_tokens=4, temperature=0.5)
    forks.join()
    s += "Verdict: " + sgl.select("verdict", ["yes", "no"])


def test_requests_of_roles_fork_and_select():
    fake = FakeBackend(reply=lambda p: "A" if p.endswith("assistant\n") else f"i{p[-3]}", liked="y")
    state = chat_fork_select.run(question="Why?", backend=fake)
    assert state.error() is None
    chat = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    after = chat + "A<|im_end|>\n"
    final = after + "Verdict: "
    calls = fake.calls
    assert calls[0] == {"text": chat, "sampling_params": {"max_new_tokens": 8, "stop": "\n"}}
    assert calls[1] == {"text": after, "sampling_params": {"max_new_tokens": 0}}  # the forks' warm-up
    assert sorted(calls[2:4], key=str) == [
        {"text": after + f"Idea {i}: ", "sampling_params": {"max_new_tokens": 4, "temperature": 0.5}} for i in (0, 1)]
    assert calls[4:] == [
        {"input_ids": ids(final), "sampling_params": {"max_new_tokens": 0}},  # the select's warm-up
        {"input_ids": [ids(final + "yes"), ids(final + "no")], "sampling_params": {"max_new_tokens": 0},
         "return_logprob": True, "logprob_start_len": len(final)},
    ]
    assert state["answer"] == "A"
    assert state["idea"] == ["i0", "i1"]
    assert state["verdict"] == "yes"
    assert state.get_meta_info("verdict")["input_token_logprobs"] == [[-1.0, -2.0, -2.0], [-2.0, -2.0]]
    assert state.text() == final + "yes"
    assert state.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
                                {"role": "assistant", "content": "A"}]


def test_role_blocks_var_scope_and_concat_join():
    @sgl.function
    def prog(s):
        with s.user():
            s += "hi"
        with s.assistant():
            with s.var_scope("said"):
                s += "x" + sgl.gen(max_tokens=2)
        forks = s.fork(2)
        forks += lambda i: str(i)
        forks.join("concate_and_append")

    state = prog.run(backend=FakeBackend(reply=lambda p: "yz"))
    assert state["said"] == "xyz"
    assert state.text().endswith("<|im_start|>assistant\nxyz<|im_end|>\n01")


def test_run_batch_warms_the_traced_prefix_once():
    @sgl.function
    def classify(s, text):
        s += "Examples...\n" + "Text: " + text + "\nLabel:"
        s += sgl.gen("label", max_tokens=2)

    fake = FakeBackend(reply=lambda p: p[-8])
    states = classify.run_batch([{"text": t} for t in ("aaa", "bbb", "ccc")], backend=fake, progress_bar=False)
    assert fake.calls[0] == {"text": "Examples...\nText: ", "sampling_params": {"max_new_tokens": 0}}
    assert sorted(c["text"] for c in fake.calls[1:]) == [f"Examples...\nText: {t}\nLabel:" for t in ("aaa", "bbb", "ccc")]
    assert [s["label"] for s in states] == ["a", "b", "c"]
    assert fake.calls[1]["sampling_params"] == {"max_new_tokens": 2}


def test_traced_prefix_includes_role_markup():
    @sgl.function
    def prog(s, q):
        s += sgl.system("S")
        s += sgl.user("Q: " + q)
        s += sgl.assistant(sgl.gen("a"))

    prefix = asyncio.run(prog.constant_prefix(FakeBackend(), ["q"]))
    assert prefix == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ: "


def test_errors_name_the_variable_and_line_and_spare_the_batch():
    def reply(prompt):
        return BackendError("max_new_tokens: must be >= 0", 400) if "bad" in prompt else "fine"

    @sgl.function
    def prog(s, x):
        s += x + sgl.gen("out", max_tokens=3)  # LINE-GEN
        if x == "boom":
            raise ValueError("program bug")

    states = prog.run_batch([{"x": "ok"}, {"x": "bad"}, {"x": "boom"}], backend=FakeBackend(reply), progress_bar=False)
    assert states[0].error() is None and states[0]["out"] == "fine"
    err = states[1].error()
    assert isinstance(err, sgl.ProgramError)
    line = next(i for i, l in enumerate(open(__file__), 1) if "LINE-GEN" in l and "next(" not in l)
    assert "variable 'out'" in str(err) and f"{__file__}:{line}" in str(err) and "HTTP 400" in str(err)
    with pytest.raises(sgl.ProgramError):
        states[1]["out"]
    assert "program 'prog' raised" in str(states[2].error()) and "program bug" in str(states[2].error())


def test_streaming_sync_and_async():
    @sgl.function
    def prog(s):
        s += "Q:" + sgl.gen("a", max_tokens=8)

    fake = FakeBackend(reply=lambda p: "abcdef", delay=0.01)
    state = prog.run(backend=fake, stream=True)
    assert list(state.text_iter("a")) == ["ab", "cd", "ef"]
    assert "".join(state.text_iter()) == "Q:abcdef"
    assert fake.calls[0]["stream"] is True

    async def main():
        st = await prog.arun(backend=fake, stream=True)
        return [c async for c in st.text_async_iter("a")], await st.text_async()

    chunks, text = asyncio.run(main())
    assert "".join(chunks) == "abcdef" and text == "Q:abcdef"


def test_async_program_and_reads():
    @sgl.function
    async def prog(s):
        s += "n=" + sgl.gen("n", max_tokens=2)
        n = await s.get_var_async("n")
        s += f" twice={int(n) * 2}"

    state = asyncio.run(prog.arun(backend=FakeBackend(reply=lambda p: "21")))
    assert state.text() == "n=21 twice=42"


def test_choices_methods():
    lps = [[-1.0, -3.0], [-1.5], [-1.0, -1.0, -9.0]]
    choices = ["a", "b", "c"]
    assert sgl.token_length_normalized(choices, lps).decision == "b"
    # position 0: a and c tie at -1; position 1: c (-1) beats a (-3)
    assert sgl.greedy_token_selection(choices, lps).decision == "c"
    un = [[-0.5, -2.5], [-0.1], [-5.0, -5.0, -5.0]]  # c is unlikely without context
    assert sgl.unconditional_likelihood_normalized(choices, lps, un).decision == "c"


def test_invalid_arguments_raise_at_once():
    with pytest.raises(ValueError, match="choices"):
        sgl.select("x", [])
    with pytest.raises(TypeError, match="json_schema"):
        sgl.gen("x", json_schema=3)


def test_reading_a_reassigned_variable_waits_for_the_new_value():
    replies = iter(["1", "2", "3"])

    @sgl.function
    def prog(s):
        seen = []
        for _ in range(3):
            s += sgl.gen("n", max_tokens=1)
            seen.append(s["n"])
        return seen

    state = prog.run(backend=FakeBackend(reply=lambda p: next(replies), delay=0.01))
    assert state.ret_value == ["1", "2", "3"]


def test_tracer_follows_role_blocks():
    from arborlm.lang.tracer import constant_exprs

    def prog(s, q):
        with s.system():
            s += "Be brief."
        with s.user():
            s += q

    exprs = [e if isinstance(e, str) else (type(e).__name__, e.role) for e in constant_exprs(prog, ["q"])]
    # it stops at the argument
    assert exprs == [("RoleBegin", "system"), "Be brief.", ("RoleEnd", "system"), ("RoleBegin", "user")]
