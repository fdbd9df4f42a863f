"""The cluster's request routers' own bookkeeping, without a cluster (where Ray is installed): a
burst is charged at choice, so it spreads before Ray reports any request routed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray", reason="the cluster extra (Ray Serve) is not installed")

from arborlm.runtime.cluster import routers  # noqa: E402
from arborlm.runtime.cluster.app import Routed  # noqa: E402

DOCS = [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(60)) + "\n" for i in range(4)]


def replica(name):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name))


def request(n, text):
    return SimpleNamespace(args=[Routed(text, "POST", "/generate", [], b"")],
                           metadata=SimpleNamespace(internal_request_id=f"r{n}"))


def router(cls, **kwargs):
    r = object.__new__(cls)  # Ray's constructor needs a running Serve; the state is ours alone
    r.initialize_state(**kwargs)
    return r


def choose(r, reps, req):
    return asyncio.run(r.choose_replicas(reps, req))[0][0].replica_id.unique_id


def test_a_burst_of_new_prefixes_spreads_before_any_is_routed():
    r, reps = router(routers.PrefixAffinityRouter, imbalance=8), [replica("A"), replica("B")]
    picks = [choose(r, reps, request(i, DOCS[i] + "Q")) for i in range(4)]
    assert sorted(picks) == ["A", "A", "B", "B"]
    assert dict(r.inflight) == {"A": 2, "B": 2}
    # the same prefixes again, still nothing routed: each follows its first request
    assert [choose(r, reps, request(10 + i, DOCS[i] + "Q2")) for i in range(4)] == picks


def test_charges_follow_ray_and_are_released():
    r, reps = router(routers.PrefixAffinityRouter, imbalance=8), [replica("A"), replica("B")]
    first = request(1, DOCS[0] + "Q")
    got = choose(r, reps, first)
    other = "B" if got == "A" else "A"
    r.on_request_routed(first, replica(other).replica_id, None)  # Ray sent it elsewhere
    assert r.inflight[got] == 0 and r.inflight[other] == 1 and not r.unsent
    assert r.table.match(DOCS[0] + "Q2", ["A", "B"])[other] > 0  # the table follows too
    second = choose(r, reps, request(2, DOCS[0] + "Q2"))
    r.on_request_completed(replica(other).replica_id, "r1")
    r.on_request_completed(replica("A").replica_id, "broadcast")  # never ours: ignored
    assert sum(r.inflight.values()) == 1 and r.charged == {"r2": second}


def test_a_request_never_sent_is_released_after_a_while(monkeypatch):
    r, reps = router(routers.RoundRobinRouter), [replica("A"), replica("B")]
    now = [1000.0]
    monkeypatch.setattr(routers.time, "monotonic", lambda: now[0])
    choose(r, reps, request(1, "x"))
    now[0] += routers.UNSENT_TTL_S + 1
    choose(r, reps, request(2, "y"))
    assert sum(r.inflight.values()) == 1 and list(r.charged) == ["r2"]
