"""The radix cache, chunked prefill and memory pressure change nothing in greedy outputs (real model)."""

import pytest

from arborlm.runtime import Engine

from conftest import assert_pool_clean

pytestmark = pytest.mark.integration

FEW_SHOT = "Q: What is 2 + 2?\nA: 4\nQ: What is the capital of Italy?\nA: Rome\nQ: Who wrote Hamlet?\nA: Shakespeare\n"
PROMPTS = [FEW_SHOT + f"Q: {q}\nA:" for q in ("What is 3 + 5?", "What colour is grass?", "Who painted the Mona Lisa?",
                                              "What is the largest planet?", "How many legs does a spider have?")]
PROMPTS += ["Once upon a time, " * k + "the end." for k in (1, 3, 6)]
PROMPTS += ["def add(a, b):\n    return", "The weather today is", "List three fruits:", "Rome was founded in"]
SP = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference(engine):
    outs = engine.generate(PROMPTS, SP)
    assert_pool_clean(engine)
    return [o["output_ids"] for o in outs]


def test_cache_hits_do_not_change_outputs(engine, reference):
    again = engine.generate(PROMPTS, SP)  # now mostly cache hits
    assert [o["output_ids"] for o in again] == reference
    assert sum(o["meta_info"]["cached_tokens"] for o in again) >= sum(o["meta_info"]["prompt_tokens"] - 1 for o in again) - 4
    assert engine.scheduler.stats.hit_rate > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(disable_radix_cache=True),
        dict(chunked_prefill_size=16),
        dict(max_total_tokens=320, max_running_requests=16, chunked_prefill_size=64),  # forces eviction + retraction
        dict(schedule_policy="fcfs"),
        dict(schedule_policy="dfs-weight", chunked_prefill_size=32),
    ],
    ids=["no-cache", "chunked", "tiny-pool", "fcfs", "dfs-weight"],
)
def test_greedy_outputs_identical_across_configurations(kwargs, reference):
    with Engine(dtype="float32", **kwargs) as eng:
        outs = eng.generate(PROMPTS, SP)
        assert [o["output_ids"] for o in outs] == reference
        stats = eng.scheduler.stats
        if kwargs.get("max_total_tokens") == 320:
            assert stats.retractions > 0 and eng.scheduler.tree.evicted_tokens > 0
        if kwargs.get("disable_radix_cache"):
            assert stats.cached_tokens == 0 and eng.scheduler.tree.total_size() == 0
        assert_pool_clean(eng)


def test_siblings_sent_together_share_their_prefix(engine):
    assert engine.flush_cache()
    outs = engine.generate(PROMPTS[:5], {"temperature": 0, "max_new_tokens": 2})
    shared = len(engine.tokenizer.encode(FEW_SHOT)) - 2
    # the first computes the few-shot prefix; the others wait one step and hit the cache
    assert sorted(o["meta_info"]["cached_tokens"] >= shared for o in outs) == [False] + [True] * 4


def test_counters_and_flush_cache(engine):
    engine.generate(PROMPTS[:3], {"temperature": 0, "max_new_tokens": 2})
    stats = engine.get_stats()
    assert stats["running_requests"] == 0 and stats["protected_tokens"] == 0
    assert stats["free_slots"] + stats["evictable_tokens"] == stats["pool_size"]
    assert 0 < stats["cache_hit_rate"] < 1 and stats["evictable_tokens"] > 0
    assert engine.flush_cache() is True
    stats = engine.get_stats()
    assert stats["evictable_tokens"] == 0 and stats["free_slots"] == stats["pool_size"]
