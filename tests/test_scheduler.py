"""Continuous batching, chunked prefill, admission and stop handling, driven without a model."""

import pytest
import torch

from arborlm.runtime.cache.memory_pool import ReqToTokenPool, TokenToKVPool
from arborlm.runtime.cache.radix_cache import RadixCache
from arborlm.runtime.detokenizer import IncrementalDetokenizer
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.scheduler.req import Req, Status
from arborlm.runtime.scheduler.scheduler import Scheduler, SchedulerConfig

EOS = 0


class CharTokenizer:
    """Token i is the letter chr(ord('a') + i - 1); 0 is EOS."""

    def decode(self, ids, **kw):
        return "".join(chr(ord("a") + i - 1) for i in ids if i != EOS)


def make(pool_size=64, max_prefill=64, max_running=8, context=128, cache=True, policy="fcfs"):
    kv = TokenToKVPool(pool_size, 1, 1, 2, torch.float32)
    cfg = SchedulerConfig(context_length=context, max_running_requests=max_running, chunked_prefill_size=max_prefill,
                          schedule_policy=policy, eos_ids={EOS})
    return Scheduler(ReqToTokenPool(max_running, context), kv, RadixCache(kv.free, disable=not cache), cfg)


def req(rid, n_prompt, max_new=4, **params):
    r = Req(rid, list(range(1, n_prompt + 1)), SamplingParams.from_dict({"max_new_tokens": max_new, **params}))
    r.detok = IncrementalDetokenizer(CharTokenizer())
    return r


def step(s, token=5):
    b = s.schedule()
    ids = [token if smp else None for smp in b.samples]
    return b, s.process(b, ids)


def clean(s):
    """All slots free or cached, nothing locked, all table rows free."""
    return (s.kv_pool.available() + s.tree.evictable_size == s.kv_pool.size and s.tree.protected_size == 0
            and s.req_pool.available() == s.req_pool.max_requests)


def test_new_requests_join_while_others_decode_and_finished_leave():
    s = make(cache=False)
    a = req("a", 5, max_new=3)
    s.add_request(a)
    b, _ = step(s)
    assert [r.rid for r in b.reqs] == ["a"] and b.extend_lens == [5] and b.num_decode == 0
    s.add_request(req("b", 4, max_new=3))
    b, _ = step(s)
    # the new prefill comes first, then a decode token for the running request, in one step
    assert [r.rid for r in b.reqs] == ["b", "a"] and b.extend_lens == [4, 1] and b.num_decode == 1
    b, outs = step(s)
    assert a.finished and a.finish_reason == {"type": "length", "length": 3}
    assert [o.req.rid for o in outs if o.finished] == ["a"]
    assert [r.rid for r in s.running] == ["b"]
    step(s)
    assert not s.has_work() and clean(s)


def test_chunked_prefill_samples_only_after_the_last_chunk():
    s = make(max_prefill=4)
    r = req("a", 10, max_new=2)
    s.add_request(r)
    lens = []
    while not r.output_ids:
        b, _ = step(s)
        lens.append(b.extend_lens[0])
    assert lens == [4, 4, 2]
    step(s)
    assert r.finished and clean(s)


def test_admission_waits_for_kv_and_never_overcommits():
    s = make(pool_size=20)
    a, b = req("a", 5, max_new=10), req("b", 5, max_new=10)  # each may hold 14 slots
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert a.status is Status.RUNNING and b.status is Status.WAITING
    while not a.finished:
        step(s)
    step(s)
    assert b.status is Status.RUNNING
    while s.has_work():
        step(s)
    assert clean(s)


def test_requests_that_cannot_fit_are_rejected_up_front():
    s = make(pool_size=20, context=64)
    with pytest.raises(BadRequestError, match="KV slots"):
        s.add_request(req("a", 15, max_new=10))
    with pytest.raises(BadRequestError, match="context length"):
        s.add_request(req("b", 60, max_new=10))
    with pytest.raises(BadRequestError, match="empty"):
        s.add_request(req("c", 0))


def test_abort_frees_running_and_waiting():
    s = make(pool_size=20)
    a, b = req("a", 5, max_new=10), req("b", 5, max_new=10)
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert s.abort("b") is b and b.finish_reason == {"type": "abort"}
    assert s.abort("a") is a
    assert s.abort("nope") is None
    assert not s.has_work() and clean(s)


def test_stop_token_eos_and_stop_strings():
    s = make()
    r = req("a", 3, max_new=10)
    s.add_request(r)
    step(s, token=4)
    step(s, token=EOS)
    assert r.finish_reason == {"type": "stop", "matched": EOS} and r.detok.text == "d"

    r = req("b", 3, max_new=10, stop=["cd"])
    s.add_request(r)
    for t in [1, 2, 3, 4, 5]:
        if not r.finished:
            step(s, token=t)
    assert r.finish_reason == {"type": "stop", "matched": "cd"} and r.detok.text == "ab"

    r = req("c", 3, max_new=10, stop=["cd"], no_stop_trim=True)
    s.add_request(r)
    for t in [1, 3, 4]:
        step(s, token=t)
    assert r.finished and r.detok.text == "acd"

    r = req("d", 3, max_new=10, ignore_eos=True, stop_token_ids=[9])
    s.add_request(r)
    step(s, token=EOS)
    assert not r.finished
    step(s, token=9)
    assert r.finish_reason == {"type": "stop", "matched": 9}
    assert clean(s)


def test_prefill_only_request_finishes_without_sampling():
    s = make()
    r = req("a", 6, max_new=0)
    s.add_request(r)
    b, outs = step(s)
    assert r.finished and r.output_ids == [] and r.finish_reason == {"type": "length", "length": 0}
    assert clean(s)


def test_table_maps_positions_to_distinct_slots():
    s = make(cache=False)
    rs = [req(str(i), 3 + i, max_new=5) for i in range(4)]
    for r in rs:
        s.add_request(r)
    step(s)
    step(s)
    used = []
    for r in rs:
        used += s.req_pool.table[r.row, : r.kv_len].tolist()
    assert len(used) == len(set(used)) == sum(r.kv_len for r in rs)
    assert not set(used) & set(s.kv_pool.allocator.free_slots.tolist())


def run_all(s, reqs, token_of=lambda r: 5 + len(r.output_ids) % 7, max_steps=2000):
    for r in reqs:
        s.add_request(r)
    for _ in range(max_steps):
        if not s.has_work():
            return
        b = s.schedule()
        assert b is not None
        s.process(b, [token_of(r) if smp else None for r, smp in zip(b.reqs, b.samples)])
    raise AssertionError("did not finish")


def test_second_request_reuses_the_cached_prefix():
    s = make()
    a = req("a", 20, max_new=3)
    run_all(s, [a])
    b = Req("b", list(range(1, 16)) + [30, 31], SamplingParams.from_dict({"max_new_tokens": 2}))
    s.add_request(b)
    batch = s.schedule()
    assert b.cached_tokens == 15 and batch.prefix_lens == [15] and batch.extend_lens == [2]
    assert s.stats.cached_tokens == 15 and s.stats.prompt_tokens == 37
    c = Req("c", list(range(1, 21)), SamplingParams.from_dict({"max_new_tokens": 2}))  # the same prompt again
    s.add_request(c)
    s.process(batch, [5])
    batch = s.schedule()
    assert c.cached_tokens == 19 and batch.reqs[0] is c and batch.extend_lens[0] == 1  # one token recomputed for logits


def test_running_requests_share_a_prompt_as_soon_as_it_is_prefilled():
    s = make()
    a, b = req("a", 12, max_new=5), req("b", 12, max_new=5)
    s.add_request(a)
    step(s)
    s.add_request(b)
    step(s)
    assert b.cached_tokens == 11  # a is still running
    assert s.tree.protected_size >= 11


def test_tiny_pool_forces_eviction_and_retraction_and_everything_completes():
    s = make(pool_size=48, max_running=8)
    reqs = [req(str(i), 6 + i % 4, max_new=30, ignore_eos=True) for i in range(8)]
    run_all(s, reqs)
    assert all(len(r.output_ids) == 30 and r.finish_reason["type"] == "length" for r in reqs)
    assert s.stats.retractions > 0
    assert clean(s)


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "dfs-weight"])
def test_policies_admit_everything_and_lpm_prefers_long_matches(policy):
    s = make(policy=policy, max_running=1)
    warm = Req("w", [9] * 10, SamplingParams.from_dict({"max_new_tokens": 1}))
    run_all(s, [warm])
    x = Req("x", [1, 2, 3, 4], SamplingParams.from_dict({"max_new_tokens": 1}))
    y = Req("y", [9] * 10 + [1], SamplingParams.from_dict({"max_new_tokens": 1}))
    s.add_request(x)
    s.add_request(y)
    b = s.schedule()
    first = b.reqs[0]
    assert first is (x if policy == "fcfs" else y)
    s.process(b, [5 if smp else None for smp in b.samples])
    run_rest = [r for r in (x, y) if not r.finished]
    while s.has_work():
        b = s.schedule()
        s.process(b, [5 if smp else None for smp in b.samples])
    assert all(r.finished for r in run_rest) and clean(s)


def test_disabled_cache_gives_no_hits_and_frees_everything():
    s = make(cache=False)
    run_all(s, [req("a", 10), req("b", 10)])
    assert s.stats.cached_tokens == 0 and s.kv_pool.available() == s.kv_pool.size


def test_flush_cache_only_when_idle():
    s = make()
    run_all(s, [req("a", 10)])
    assert s.tree.evictable_size > 0
    s.add_request(req("b", 5))
    assert not s.flush_cache()
    run_all(s, [])
    assert s.flush_cache() and s.kv_pool.available() == s.kv_pool.size


def test_dfs_weight_groups_requests_by_shared_prefix():
    from arborlm.runtime.scheduler.policy import order_waiting

    s = make(policy="dfs-weight")
    for p in ([1] * 8, [2] * 8):
        run_all(s, [Req("w" + str(p[0]), p + [3], SamplingParams.from_dict({"max_new_tokens": 1}))])
    waiting = []
    for i in range(3):  # interleaved: prefix 1, prefix 2, no match
        waiting += [Req(f"a{i}", [1] * 8 + [10 + i], SamplingParams()),
                    Req(f"b{i}", [2] * 8 + [10 + i], SamplingParams()),
                    Req(f"c{i}", [20 + i, 5], SamplingParams())]
    waiting.append(Req("a3", [1] * 8 + [13], SamplingParams()))
    order = [r.rid for r in order_waiting("dfs-weight", waiting, s.tree)]
    assert order[:4] == ["a0", "a1", "a2", "a3"]  # heaviest subtree first
    assert order[4:7] == ["b0", "b1", "b2"] and order[7:] == ["c0", "c1", "c2"]
