"""Structured generation through the Engine on the real model: every output of the corpus
validates or matches, greedy and at temperature 1, on both backends with jump-forward on and off,
in batches that mix constrained and free requests; bad specs are refused and serving goes on."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from arborlm.runtime.constrained.corpus import REFUSED, REGEXES, SCHEMAS
from arborlm.runtime.constrained.factory import BACKENDS
from arborlm.runtime.errors import BadRequestError
from conftest import assert_pool_clean

pytestmark = pytest.mark.integration
# The test bounds of the JSON guard (defaults 512 / 16): a looping string or nesting is steered
# to close after 32 characters / 4 levels, so every output fits MAX_NEW.
BOUNDS = {"json_max_string_length": 32, "json_max_depth": 4}
MAX_NEW = 256
TEMPERATURES = (0.0, 1.0)


@pytest.fixture(scope="module", params=BACKENDS)
def corpus_engine(request, real_model_dir):
    from arborlm.runtime import Engine

    engine = Engine(dtype="float32", max_total_tokens=32768, max_running_requests=160,
                    grammar_backend=request.param, **BOUNDS)
    yield engine
    engine.shutdown()


def jump_forward(engine, on: bool):
    """Switch jump-forward on an idle engine (the scheduler reads its config every step)."""
    from arborlm.runtime.constrained.jump_forward import JumpForward

    engine.scheduler.cfg.jump_forward = JumpForward(engine.tokenizer) if on else None


def corpus_batch(backend: str):
    """Every schema the backend compiles and every regex, greedy and at temperature 1, with a
    free request after every fifth, so constrained and free rows share each batch."""
    prompts, params, checks = [], [], []
    for temperature in TEMPERATURES:
        base = {"temperature": temperature, "max_new_tokens": MAX_NEW, "seed": 1}
        for i, (name, schema) in enumerate(SCHEMAS.items()):
            if name in REFUSED[backend]:
                continue
            prompts.append(f"Write one JSON value for this JSON schema.\nSchema: {json.dumps(schema)}\nJSON:")
            params.append({**base, "json_schema": json.dumps(schema)})
            v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
            checks.append((name, temperature, lambda t, v=v: v.validate(json.loads(t))))
            if i % 5 == 0:
                prompts.append("Tell me about the sea.")
                params.append({**base, "max_new_tokens": 16, "ignore_eos": True})
                checks.append(("free", temperature, None))
        for name, rx in REGEXES.items():
            prompts.append(f"Answer in the format {name.replace('_', ' ')}:")
            params.append({**base, "regex": rx})
            checks.append((name, temperature, lambda t, rx=rx: re.fullmatch(rx, t) or pytest.fail(f"{t!r} !~ {rx}")))
    return prompts, params, checks


def run_corpus(engine, backend: str, jf: bool):
    jump_forward(engine, jf)
    prompts, params, checks = corpus_batch(backend)
    outs = engine.generate(prompts, params)
    for (name, temperature, check), out in zip(checks, outs):
        reason = out["meta_info"]["finish_reason"]["type"]
        if check is None:
            assert reason == "length" and out["meta_info"]["completion_tokens"] == 16
        else:
            assert reason == "stop", (name, temperature, jf, out["text"], out["meta_info"]["finish_reason"])
            check(out["text"])
    assert_pool_clean(engine)
    return checks, outs


def test_every_corpus_output_validates_with_and_without_jump_forward(corpus_engine):
    """The whole corpus on each backend, jump-forward off then on. Greedy outputs must also be
    equal between the two wherever decoding without jump-forward produced the canonical
    tokenisation of its text: jump-forward writes forced text in canonical tokens, so where the
    model chose an odd split (`k` + `ind` for `kind`) the continuations may differ, and both
    outputs must still validate."""
    backend = corpus_engine.args.grammar_backend
    checks, plain = run_corpus(corpus_engine, backend, jf=False)
    _, jumped = run_corpus(corpus_engine, backend, jf=True)
    assert corpus_engine.scheduler.cfg.jump_forward.jumps > 0
    compared = greedy = 0
    for (name, temperature, check), a, b in zip(checks, plain, jumped):
        if check is None or temperature != 0:
            continue
        greedy += 1
        if corpus_engine.tokenizer.encode(a["text"], add_special_tokens=False) == a["output_ids"]:
            compared += 1
            assert b["text"] == a["text"], name
    assert compared >= greedy // 4, (compared, greedy)


def test_max_tokens_cut_is_length(engine):
    out = engine.generate("List:", {"temperature": 0, "max_new_tokens": 5, "json_schema": SCHEMAS["array_of_objects"]})
    assert out["meta_info"]["finish_reason"]["type"] == "length" and out["meta_info"]["completion_tokens"] <= 5


@pytest.mark.parametrize("params,reason", [
    ({"regex": "a(b"}, "regex"),
    ({"json_schema": {"type": "array", "uniqueItems": True}, "json_schema_strict": True}, "uniqueItems"),
    ({"json_schema": "{oops"}, "not valid JSON"),
    ({"regex": "a+", "ebnf": 'root ::= "a"'}, "mutually exclusive"),
    ({"ebnf": "root ::= undefined_rule"}, "ebnf"),
])
def test_bad_specs_are_bad_requests_and_serving_goes_on(engine, params, reason):
    with pytest.raises(BadRequestError, match=reason):
        engine.generate("Hi", {**params, "max_new_tokens": 4})
    ok = engine.generate("Hi", {"max_new_tokens": 3, "temperature": 0, "regex": "(yes|no)"})
    assert ok["text"] in ("yes", "no")


TIGHT = {"type": "object", "required": ["name", "tags", "meta"],
         "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                        "meta": {"type": "object", "properties": {"note": {"type": "string"}}}}}


def test_a_tight_budget_still_ends_in_a_complete_document(engine):
    """The guard steers to close as max_new_tokens nears: at temperature 1 (long strings, long arrays)
    every document here ends complete and valid within 48 tokens."""
    prompts = ["Describe a random object as JSON:"] * 6
    params = [{"json_schema": TIGHT, "max_new_tokens": 48, "temperature": 1.0, "seed": s} for s in range(6)]
    for out in engine.generate(prompts, params):
        meta = out["meta_info"]
        assert meta["finish_reason"]["type"] == "stop" and meta["json_schema_valid"] is True, out["text"]
        assert meta["completion_tokens"] <= 48
