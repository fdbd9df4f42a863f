"""Deadlines (sampling_params.timeout / --request-timeout) in the engine, on the tiny model: a request
past its deadline is aborted wherever it is, answers with what it has, and frees its KV."""

import asyncio

import pytest

from arborlm.runtime.errors import BadRequestError
from conftest import assert_pool_clean


def test_a_request_past_its_deadline_ends_with_what_it_has(tiny_engine):
    out = tiny_engine.generate("Once upon a time", {"max_new_tokens": 450, "ignore_eos": True, "timeout": 0.05})
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["timeout"] == 0.05 and "timed out" in reason["message"]
    assert 0 < out["meta_info"]["completion_tokens"] < 450
    assert len(out["output_ids"]) == out["meta_info"]["completion_tokens"]
    assert_pool_clean(tiny_engine)


def test_waiting_and_running_requests_all_expire_and_free_their_kv(tiny_engine):
    async def go():
        params = {"max_new_tokens": 400, "ignore_eos": True, "timeout": 0.2}
        return await asyncio.gather(*(tiny_engine.async_generate(f"prompt {i}", params) for i in range(48)))

    outs = asyncio.run(go())
    assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs)
    assert_pool_clean(tiny_engine)


def test_a_generous_deadline_changes_nothing(tiny_engine):
    a = tiny_engine.generate("Hello", {"max_new_tokens": 8, "temperature": 0})
    b = tiny_engine.generate("Hello", {"max_new_tokens": 8, "temperature": 0, "timeout": 600})
    assert a["output_ids"] == b["output_ids"] and b["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.parametrize("bad", [0, -1, "soon", True])
def test_a_bad_timeout_is_refused_by_name(tiny_engine, bad):
    with pytest.raises(BadRequestError, match="sampling_params.timeout"):
        tiny_engine.generate("Hello", {"max_new_tokens": 2, "timeout": bad})
