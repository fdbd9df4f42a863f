"""Continuous batching, chunked prefill, admission and stop handling, driven without a model."""

import pytest
import torch

from arborlm.runtime.cache.memory_pool import ReqToTokenPool, TokenToKVPool
from arborlm.runtime.detokenizer import IncrementalDetokenizer
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.scheduler.req import Req, Status
from arborlm.runtime.scheduler.scheduler import Scheduler

EOS = 0


class CharTokenizer:
    """Token i is the letter chr(ord('a') + i - 1); 0 is EOS."""

    def decode(self, ids, **kw):
        return "".join(chr(ord("a") + i - 1) for i in ids if i != EOS)


def make(pool_size=64, max_prefill=64, max_running=8, context=128):
    kv = TokenToKVPool(pool_size, 1, 1, 2, torch.float32)
    return Scheduler(ReqToTokenPool(max_running, context), kv, context_length=context,
                     max_running_requests=max_running, max_prefill_tokens=max_prefill, eos_ids={EOS})


def req(rid, n_prompt, max_new=4, **params):
    r = Req(rid, list(range(1, n_prompt + 1)), SamplingParams.from_dict({"max_new_tokens": max_new, **params}))
    r.detok = IncrementalDetokenizer(CharTokenizer())
    return r


def step(s, token=5):
    b = s.schedule()
    ids = [token if smp else None for smp in b.samples]
    return b, s.process(b, ids)


def clean(s):
    return s.kv_pool.available() == s.kv_pool.size and s.reserved == 0 and s.req_pool.available() == s.req_pool.max_requests


def test_new_requests_join_while_others_decode_and_finished_leave():
    s = make()
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
        assert s.kv_pool.available() - s.reserved >= 0
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
    s = make()
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
