"""Integration tests on the real embedded model (float32): parity with transformers, batching,
sampling features, streaming, errors and KV accounting. One engine shared by the session."""

import asyncio
import threading
import time

import pytest
import torch

from conftest import assert_pool_clean

pytestmark = pytest.mark.integration

GREEDY = {"temperature": 0, "max_new_tokens": 40}
RAW_PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis is the process by which",
    "1, 2, 3, 4, 5,",
    "The three most important inventions of the 20th century are",
]
CHAT = ["Write a short story about a robot who learns to paint.", "List five uses for a paperclip."]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in CHAT]
    return RAW_PROMPTS + chat


def hf_generate(hf_model, ids, n):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_greedy_is_token_identical_to_transformers(engine, hf_model, prompts):
    outs = engine.generate(prompts, GREEDY)
    long_ones = 0
    for p, out in zip(prompts, outs):
        ids = engine.tokenizer.encode(p)
        ref = hf_generate(hf_model, ids, GREEDY["max_new_tokens"])
        assert out["output_ids"] == ref, p
        long_ones += len(ref) >= 32
    assert long_ones >= 6  # most prompts really run 32+ tokens
    assert_pool_clean(engine)


def test_prefill_logits_match_transformers(engine, hf_model, prompts):
    # Tolerance: float32, different op order (fused q/k/v, fused gate/up) -> |delta logprob| < 2e-3.
    for p in prompts[:4]:
        ids = engine.tokenizer.encode(p)
        out = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 1},
                              return_logprob=True, top_logprobs_num=20)
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
        top = out["meta_info"]["output_top_logprobs"][0]
        ids_ours = [t for _, t, _ in top]
        assert ids_ours[:5] == ref.topk(5).indices.tolist()
        assert torch.allclose(torch.tensor([v for v, _, _ in top]), ref[ids_ours], atol=2e-3)
        lp, tok, _ = out["meta_info"]["output_token_logprobs"][0]
        assert tok == out["output_ids"][0] and abs(lp - ref[tok].item()) < 2e-3


def test_batch_invariance_alone_in_batch_and_mid_decode(engine, prompts, tokenizer):
    probe = prompts[2]
    sp = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    alone = engine.generate(probe, sp)["output_ids"]
    # 16 mixed-length prompts with the probe in the middle
    others = [("word " * (3 + 7 * i)) + str(i) for i in range(15)]
    batch = others[:8] + [probe] + others[8:]
    assert engine.generate(batch, sp)[8]["output_ids"] == alone

    # the probe arrives while 8 long requests are mid-decode
    results = {}
    t = threading.Thread(target=lambda: results.setdefault(
        "bg", engine.generate(others[:8], {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True})))
    t.start()
    deadline = time.time() + 60
    while not any(r.output_ids for r in engine.scheduler.running) and time.time() < deadline:
        time.sleep(0.005)
    assert engine.scheduler.running, "background requests should be decoding"
    mid = engine.generate(probe, sp)["output_ids"]
    t.join()
    assert mid == alone
    assert all(r["meta_info"]["completion_tokens"] == 64 for r in results["bg"])
    assert_pool_clean(engine)


def test_stop_strings(engine):
    p = "1, 2, 3, 4, 5,"
    full = engine.generate(p, {"temperature": 0, "max_new_tokens": 30})["text"]
    assert " 8," in full
    out = engine.generate(p, {"temperature": 0, "max_new_tokens": 30, "stop": [" 8,", "never here"]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": " 8,"}
    assert out["text"] == full[: full.index(" 8,")]
    kept = engine.generate(p, {"temperature": 0, "max_new_tokens": 30, "stop": " 8,", "no_stop_trim": True})
    assert kept["text"].endswith(" 8,")
    ids = engine.tokenizer.encode(" 7")
    tok = engine.generate(p, {"temperature": 0, "max_new_tokens": 30, "stop_token_ids": ids[-1:]})
    assert tok["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[-1]}


def test_seeds_reproduce_and_differ(engine):
    sp = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 24, "ignore_eos": True}
    p = "Once upon a time"
    a = engine.generate(p, {**sp, "seed": 11})["output_ids"]
    b = engine.generate(p, {**sp, "seed": 11})["output_ids"]
    c = engine.generate(p, {**sp, "seed": 12})["output_ids"]
    # the same seed inside a batch with other sampled requests
    batch = engine.generate([p, p, "Hello"], [{**sp}, {**sp, "seed": 11}, {**sp}])
    assert a == b == batch[1]["output_ids"]
    assert a != c


def test_n_samples(engine):
    outs = engine.generate("Tell me a joke.", {"temperature": 1.0, "max_new_tokens": 16, "n": 3, "seed": 5})
    assert isinstance(outs, list) and len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) == 3
    outs2 = engine.generate(["A", "B"], {"temperature": 0, "max_new_tokens": 4, "n": 2})
    assert len(outs2) == 4 and outs2[0]["output_ids"] == outs2[1]["output_ids"]
    assert_pool_clean(engine)


def test_logprobs_greedy_consistency(engine):
    out = engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8},
                          return_logprob=True, top_logprobs_num=3)
    meta = out["meta_info"]
    assert len(meta["output_token_logprobs"]) == len(out["output_ids"]) == meta["completion_tokens"]
    for (lp, tok, _), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert len(top) == 3 and top[0][1] == tok and abs(top[0][0] - lp) < 1e-6 and lp <= 0
    assert "output_token_logprobs" not in engine.generate("Hi", {"max_new_tokens": 2})["meta_info"]


def test_streaming_matches_and_abort_frees(engine):
    p = "Once upon a time, in a small village by the sea,"
    sp = {"temperature": 0, "max_new_tokens": 24}
    full = engine.generate(p, sp)

    async def collect():
        chunks = [c async for c in await engine.async_generate(p, sp, stream=True)]
        return chunks

    chunks = asyncio.run(collect())
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
    assert len(chunks) > 3
    sync_chunks = list(engine.generate(p, sp, stream=True))
    assert "".join(c["text"] for c in sync_chunks) == full["text"]

    async def abort_early():
        gen = await engine.async_generate(p, {"max_new_tokens": 500, "ignore_eos": True}, stream=True)
        async for _ in gen:
            break
        await gen.aclose()

    asyncio.run(abort_early())

    async def cancel():
        task = asyncio.ensure_future(engine.async_generate(p, {"max_new_tokens": 500, "ignore_eos": True}))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel())
    time.sleep(0.2)
    assert_pool_clean(engine)


def test_async_generate_concurrent(engine):
    async def main():
        return await asyncio.gather(*[engine.async_generate(f"Count: {i},", {"temperature": 0, "max_new_tokens": 8})
                                      for i in range(6)])

    outs = asyncio.run(main())
    assert all(o["meta_info"]["completion_tokens"] >= 1 for o in outs)
    assert outs[0]["output_ids"] == engine.generate("Count: 0,", {"temperature": 0, "max_new_tokens": 8})["output_ids"]


def test_cached_tokens_for_a_second_request_sharing_a_prefix(engine):
    shared = "You are a careful assistant. Answer in one short sentence, with no preamble at all. " * 3
    first = engine.generate(shared + "Question: what colour is the sky?", {"temperature": 0, "max_new_tokens": 4})
    second = engine.generate(shared + "Question: what is two plus two?", {"temperature": 0, "max_new_tokens": 4})
    n_shared = len(engine.tokenizer.encode(shared + "Question: what"))
    assert first["meta_info"]["cached_tokens"] < n_shared - 8  # nothing like it was cached before
    assert n_shared - 2 <= second["meta_info"]["cached_tokens"] <= n_shared + 1
    again = engine.generate(shared + "Question: what is two plus two?", {"temperature": 0, "max_new_tokens": 4})
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert again["output_ids"] == second["output_ids"]
    assert_pool_clean(engine)


def test_prefill_only_and_metadata(engine):
    out = engine.generate("Warm the cache with this prompt.", {"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    out = engine.generate("Hello there", {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True})
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode("Hello there"))
    assert meta["completion_tokens"] == 5
    assert meta["finish_reason"] == {"type": "length", "length": 5} and meta["e2e_latency"] > 0
    assert len(meta["id"]) == 32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt=""), "empty"),
        (dict(prompt="hi", input_ids=[1]), "exactly one"),
        (dict(), "exactly one"),
        (dict(prompt=["ok", 3]), "prompt"),
        (dict(input_ids=[1, -4]), "input_ids"),
        (dict(prompt="hi", sampling_params={"top_p": 0}), "top_p"),
        (dict(prompt="hi", sampling_params={"max_new_tokens": -1}), "max_new_tokens"),
        (dict(prompt="hi", sampling_params={"bogus": 1}), "bogus"),
        (dict(prompt="hi", sampling_params={"max_new_tokens": 9000}), "context length"),
        (dict(prompt="hi", top_logprobs_num=-1), "top_logprobs_num"),
        (dict(prompt=["a", "b"], sampling_params=[{}]), "one entry per prompt"),
    ],
)
def test_bad_input_raises_and_engine_keeps_serving(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(**kwargs)
    assert engine.generate("Hi", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] >= 1
    assert_pool_clean(engine)
