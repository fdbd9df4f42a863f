"""Priorities in the scheduler, without a model: admission order, aging, retraction and preemption."""

import time

from test_scheduler import clean, make, req, step


def prio(rid, n_prompt, priority, max_new=4, **kw):
    r = req(rid, n_prompt, max_new=max_new, **kw)
    r.priority = priority
    return r


def run_to_end(s, limit=200):
    order = []
    for _ in range(limit):
        if not s.has_work():
            break
        b, _ = step(s)
        order += [r.rid for r in b.reqs if r.rid not in order]
    return order


def test_higher_priority_is_admitted_first_under_every_policy():
    for policy in ("priority", "fcfs", "lpm"):
        s = make(max_running=1, policy=policy)
        for r in (prio("low1", 4, 0), prio("low2", 4, 0), prio("high", 4, 5)):
            s.add_request(r)
        assert run_to_end(s) == ["high", "low1", "low2"], policy
        assert clean(s)


def test_low_priority_values_first_flips_the_order():
    s = make(max_running=1, policy="priority")
    s.cfg.low_priority_first = True
    for r in (prio("a", 4, 5), prio("b", 4, 1)):
        s.add_request(r)
    assert run_to_end(s) == ["b", "a"]


def test_equal_priorities_keep_the_policy_order():
    s = make(max_running=1, policy="priority")
    for rid in "abc":
        s.add_request(prio(rid, 4, 3))
    assert run_to_end(s) == ["a", "b", "c"]


def test_waiting_raises_priority_so_nothing_starves():
    s = make(max_running=1, policy="priority")
    s.cfg.priority_aging_s = 1.0
    old = prio("old", 4, 0)
    old.created = time.perf_counter() - 3.5  # arrived 3 aging periods ago: effective priority 3
    s.add_request(old)
    s.add_request(prio("new", 4, 2))
    assert run_to_end(s) == ["old", "new"]


def test_priority_preempts_a_lower_running_request_and_it_resumes():
    s = make(max_running=1, policy="priority")
    low = prio("low", 4, 0, max_new=20)
    s.add_request(low)
    for _ in range(3):
        step(s)
    assert low in s.running and len(low.output_ids) == 3
    high = prio("high", 4, 9, max_new=2)
    s.add_request(high)
    b, _ = step(s)
    assert [r.rid for r in b.reqs] == ["high"] and low in s.waiting  # retracted, then high admitted
    assert s.stats.retractions == 1
    run_to_end(s)
    assert high.finish_reason["type"] == "length" and low.finish_reason["type"] == "length"
    assert len(low.output_ids) == 20  # its tokens were kept across the retraction
    assert clean(s)


def test_no_preemption_among_equal_priorities_or_under_other_policies():
    for policy, p_new in (("priority", 0), ("lpm", 9)):
        s = make(max_running=1, policy=policy)
        first = prio("first", 4, 0, max_new=6)
        s.add_request(first)
        step(s)
        s.add_request(prio("second", 4, p_new))
        b, _ = step(s)
        assert [r.rid for r in b.reqs] == ["first"] and s.stats.retractions == 0, policy


def test_memory_pressure_retracts_the_lowest_priority_first():
    s = make(pool_size=24, max_running=4, policy="fcfs", cache=False)
    hi, lo = prio("hi", 4, 5, max_new=10, ignore_eos=True), prio("lo", 4, 0, max_new=10, ignore_eos=True)
    s.add_request(lo)
    s.add_request(hi)
    run_to_end(s)
    assert s.stats.retractions >= 1
    assert hi.finish_time < lo.finish_time  # the high-priority request kept its place and ended first
    assert clean(s)


def test_an_aged_running_request_is_no_longer_preempted():
    s = make(max_running=1, policy="priority")
    s.cfg.priority_aging_s = 1.0
    low = prio("low", 4, 0, max_new=6)
    low.created = time.perf_counter() - 10.5  # arrived long ago: effective priority 10
    s.add_request(low)
    step(s)
    s.add_request(prio("high", 4, 9, max_new=2))
    b, _ = step(s)
    assert [r.rid for r in b.reqs] == ["low"] and s.stats.retractions == 0
