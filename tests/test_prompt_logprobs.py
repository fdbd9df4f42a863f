"""Prompt (input) logprobs: against transformers, across cache hits, chunks and prefill-only requests."""

import pytest
import torch

from arborlm.runtime import Engine

from conftest import assert_pool_clean

PROMPT = list(range(200, 260))


@pytest.fixture(scope="module")
def ref_logprobs(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([PROMPT])).logits[0], -1)


def check(meta, ref, start, top=0):
    got = meta["input_token_logprobs"]
    assert [t for _, t, _ in got] == PROMPT[start:]
    for j, (lp, tok, _) in enumerate(got, start=start):
        if j == 0:
            assert lp is None
        else:
            assert abs(lp - ref[j - 1, tok].item()) < 1e-4
    if top:
        for j, entries in enumerate(meta["input_top_logprobs"], start=start):
            if j > 0:
                assert [t for _, t, _ in entries] == ref[j - 1].topk(top).indices.tolist()


@pytest.mark.parametrize("chunk", [8192, 7])
def test_prompt_logprobs_match_transformers(tiny_model_dir, ref_logprobs, chunk):
    with Engine(tiny_model_dir, dtype="float32", max_total_tokens=2048, chunked_prefill_size=chunk) as eng:
        for start in (0, 1, 25):
            out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                               logprob_start_len=start, top_logprobs_num=3)
            check(out["meta_info"], ref_logprobs, start, top=3)
            assert out["meta_info"]["completion_tokens"] == 0
        # default (-1): only the last prompt token
        out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 2, "temperature": 0},
                           return_logprob=True)
        check(out["meta_info"], ref_logprobs, len(PROMPT) - 1)
        assert len(out["meta_info"]["output_token_logprobs"]) == 2
        assert_pool_clean(eng)


def test_prompt_logprobs_after_a_cached_prefix(tiny_model_dir, ref_logprobs):
    with Engine(tiny_model_dir, dtype="float32", max_total_tokens=2048) as eng:
        eng.generate(input_ids=PROMPT[:40], sampling_params={"max_new_tokens": 0})  # warm the cache
        out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                           logprob_start_len=40)
        check(out["meta_info"], ref_logprobs, 40)
        assert out["meta_info"]["cached_tokens"] == 39  # the logits before token 40 are recomputed
        # without logprobs the whole prefix is reused
        out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 0})
        assert out["meta_info"]["cached_tokens"] == len(PROMPT) - 1
        assert_pool_clean(eng)
