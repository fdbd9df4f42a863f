"""Structured generation through the Engine on the real model: every output of the corpus
validates or matches, greedy and at temperature 1, on both backends with jump-forward on and off,
in batches that mix constrained and free requests; bad specs are refused and serving goes on."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from arborlm.runtime.errors import BadRequestError
from conftest import assert_pool_clean
from structured_corpus import REFUSED, REGEXES, SCHEMAS

pytestmark = pytest.mark.integration
MAX_NEW = 96
# The whole corpus runs in test_constrained.py without a model; here a slice that covers each
# feature keeps the real-model runs to a couple of minutes on 2 cores.
ENGINE_SCHEMAS = ["flat_required", "optional_fields", "array_exact", "array_of_objects", "enum_mixed",
                  "const_string", "anyof_null", "ref_defs", "recursive_tree", "string_pattern_code",
                  "string_length", "integer_bounds", "additional_false_nested", "invoice"]
ENGINE_REGEXES = ["phone", "ipv4", "yes_no", "semver"]
# A 135M model sometimes repeats inside a string ("1234567890123...") until max_tokens: such an
# output is a valid prefix cut with finish_reason "length", allowed for at most this share.
MAX_LENGTH_SHARE = 0.15


@pytest.fixture(scope="module")
def outlines_engine(real_model_dir):
    from arborlm.runtime import Engine

    engine = Engine(dtype="float32", max_total_tokens=16384, max_running_requests=64,
                    grammar_backend="outlines", enable_jump_forward=False)
    yield engine
    engine.shutdown()


def jump_forward(engine, on: bool):
    """Switch jump-forward on an idle engine (the scheduler reads its config every step)."""
    from arborlm.runtime.constrained.jump_forward import JumpForward

    engine.scheduler.cfg.jump_forward = JumpForward(engine.tokenizer) if on else None


def corpus_batch(backend: str, temperature: float):
    """One request per schema the backend compiles and per regex, with a free request after every
    fifth, so constrained and free rows share each batch."""
    prompts, params, checks = [], [], []
    base = {"temperature": temperature, "max_new_tokens": MAX_NEW, "seed": 1}
    for i, name in enumerate(ENGINE_SCHEMAS):
        schema = SCHEMAS[name]
        if name in REFUSED[backend]:
            continue
        prompts.append(f"Write one JSON value for this JSON schema.\nSchema: {json.dumps(schema)}\nJSON:")
        params.append({**base, "json_schema": json.dumps(schema)})
        v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        checks.append((name, lambda t, v=v: v.validate(json.loads(t))))
        if i % 5 == 0:
            prompts.append("Tell me about the sea.")
            params.append({**base, "max_new_tokens": 16})
            checks.append(("free", None))
    for name in ENGINE_REGEXES:
        rx = REGEXES[name]
        prompts.append(f"Answer in the format {name.replace('_', ' ')}:")
        params.append({**base, "regex": rx})
        checks.append((name, lambda t, rx=rx: re.fullmatch(rx, t) or pytest.fail(f"{t!r} !~ {rx}")))
    return prompts, params, checks


def run_corpus(engine, backend: str, temperature: float):
    prompts, params, checks = corpus_batch(backend, temperature)
    outs = engine.generate(prompts, params)
    cut = 0
    for (name, check), out in zip(checks, outs):
        reason = out["meta_info"]["finish_reason"]["type"]
        if check is None:
            assert reason == "length"
        elif reason == "length":
            assert out["meta_info"]["completion_tokens"] == MAX_NEW, (name, out["text"])
            cut += 1
        else:
            assert reason == "stop", (name, out)
            check(out["text"])
    assert cut <= MAX_LENGTH_SHARE * sum(c is not None for _, c in checks), cut
    assert_pool_clean(engine)
    return outs


# Each backend runs with jump-forward on and off, and each temperature with both backends.
@pytest.mark.parametrize("jf,temperature", [(True, 0.0), (False, 1.0)])
def test_corpus_xgrammar(engine, jf, temperature):
    jump_forward(engine, jf)
    try:
        run_corpus(engine, "xgrammar", temperature)
    finally:
        jump_forward(engine, True)


@pytest.mark.parametrize("jf,temperature", [(False, 0.0), (True, 1.0)])
def test_corpus_outlines(outlines_engine, jf, temperature):
    jump_forward(outlines_engine, jf)
    try:
        run_corpus(outlines_engine, "outlines", temperature)
    finally:
        jump_forward(outlines_engine, False)


@pytest.mark.parametrize("name", ["const_string", "enum_strings", "array_exact", "ref_defs"])
def test_jump_forward_keeps_greedy_output_where_tokenisation_is_canonical(engine, name):
    """Jump-forward writes forced text in canonical tokens. Where greedy decoding without it also
    produced canonical tokens the outputs must be equal; where the model chose an odd split
    (`k` + `ind` for `kind`) the continuations may differ, and both must still validate."""
    schema = SCHEMAS[name]
    sp = {"temperature": 0, "max_new_tokens": 64, "json_schema": schema}
    prompt = f"Give one {name.replace('_', ' ')} record as JSON:"
    jump_forward(engine, False)
    plain = engine.generate(prompt, sp)
    jump_forward(engine, True)
    jumped = engine.generate(prompt, sp)
    assert engine.scheduler.cfg.jump_forward.jumps > 0
    for out in (plain, jumped):
        jsonschema.validate(json.loads(out["text"]), schema)
    if engine.tokenizer.encode(plain["text"]) == plain["output_ids"]:
        assert jumped["text"] == plain["text"]
    assert_pool_clean(engine)


def test_max_tokens_cut_is_length(engine):
    out = engine.generate("List:", {"temperature": 0, "max_new_tokens": 5, "json_schema": SCHEMAS["array_of_objects"]})
    assert out["meta_info"]["finish_reason"]["type"] == "length" and out["meta_info"]["completion_tokens"] <= 5


@pytest.mark.parametrize("params,reason", [
    ({"regex": "a(b"}, "regex"),
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"json_schema": "{oops"}, "not valid JSON"),
    ({"regex": "a+", "ebnf": 'root ::= "a"'}, "mutually exclusive"),
    ({"ebnf": "root ::= undefined_rule"}, "ebnf"),
])
def test_bad_specs_are_bad_requests_and_serving_goes_on(engine, params, reason):
    with pytest.raises(BadRequestError, match=reason):
        engine.generate("Hi", {**params, "max_new_tokens": 4})
    ok = engine.generate("Hi", {"max_new_tokens": 3, "temperature": 0, "regex": "(yes|no)"})
    assert ok["text"] in ("yes", "no")
