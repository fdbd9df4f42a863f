"""Ray Serve request routers for the replica deployment (--router prefix | round-robin; pow2 is
Ray's own PowerOfTwoChoicesRequestRouter).

A router lives in the process that holds the replicas' handle: the ingress replica (one per
application here), so its table and load counts see every request and need no actor. It reads the
routing key from the handle call's first argument (app.Routed.key: the prompt text, or None).
Load is this router's own count of requests in flight per replica (chosen, not yet completed).
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from arborlm.runtime.cluster.prefix_table import PrefixTable, choose

UNSENT_TTL_S = 60.0  # a charge not confirmed by on_request_routed in this long: the request never went


class _Counting(RequestRouter):
    """Counts each replica's requests in flight, from the moment this router chooses: Ray calls
    on_request_routed only once the replica has accepted (a round trip later), so a burst routed
    meanwhile would all see the same stale loads (and prefix table) and pile onto one replica.
    A request is charged to its first-ranked replica at choice, moved if Ray routed it elsewhere,
    and released when it completes; one cancelled before it was sent is released after
    UNSENT_TTL_S."""

    def initialize_state(self, **kwargs):
        self.inflight: dict[str, int] = defaultdict(int)
        self.charged: dict[str, str] = {}  # internal request id -> the replica it counts on
        self.unsent: dict[str, float] = {}  # charged at choice, not yet routed: id -> when (oldest first)

    def charge(self, pending_request: PendingRequest | None, ranks: list[list[RunningReplica]]) -> None:
        if pending_request is None or not ranks or not ranks[0]:
            return
        req_id = pending_request.metadata.internal_request_id
        self._release(req_id)  # chosen again (a retry of the routing): the old charge goes
        self._count(req_id, ranks[0][0].replica_id.unique_id)
        self.unsent[req_id] = time.monotonic()
        cutoff = time.monotonic() - UNSENT_TTL_S
        while self.unsent:
            old, t = next(iter(self.unsent.items()))
            if t > cutoff:
                break
            self._release(old)

    def _count(self, req_id: str, rid: str) -> None:
        self.charged[req_id] = rid
        self.inflight[rid] += 1

    def _release(self, req_id: str) -> None:
        self.unsent.pop(req_id, None)
        rid = self.charged.pop(req_id, None)
        if rid is not None:
            self.inflight[rid] = max(self.inflight[rid] - 1, 0)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        req_id = pending_request.metadata.internal_request_id
        if self.charged.get(req_id) != replica_id.unique_id:
            self._release(req_id)
            self._count(req_id, replica_id.unique_id)
        self.unsent.pop(req_id, None)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Also called for calls this router never placed (broadcasts): only ours count."""
        self._release(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self.inflight.pop(replica_id.unique_id, None)


def _key(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None or not pending_request.args:
        return None
    return getattr(pending_request.args[0], "key", None)


def _avoid(pending_request: PendingRequest | None) -> str | None:
    """A retry names the replica that failed: it goes last."""
    if pending_request is None or not pending_request.args:
        return None
    return getattr(pending_request.args[0], "avoid", None)


def _last(ranks: list[list[RunningReplica]], avoid: str | None) -> list[list[RunningReplica]]:
    if avoid is None:
        return ranks
    keep = [[r for r in rank if r.replica_id.unique_id != avoid] for rank in ranks]
    bad = [r for rank in ranks for r in rank if r.replica_id.unique_id == avoid]
    return [rank for rank in keep if rank] + ([bad] if bad else [])


class PrefixAffinityRouter(_Counting):
    """Sends a request to the replica that was sent the longest prefix of its prompt, unless the
    queues are imbalanced (prefix_table.choose: by more than `imbalance` requests and `ratio` times)."""

    def initialize_state(self, imbalance: int = 8, ratio: float = 3.0, capacity: int = 200_000, **kwargs):
        super().initialize_state()
        self.table = PrefixTable(capacity)
        self.imbalance, self.ratio = imbalance, ratio

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: self.inflight[rid] for rid in by_id}
        key = _key(pending_request)
        ranks = _last([[by_id[rid] for rid in rank] for rank in choose(self.table, key, loads, self.imbalance, self.ratio)],
                      _avoid(pending_request))
        self.charge(pending_request, ranks)
        if key and ranks:  # at once, as the load: the next request of a burst sees this prefix placed
            self.table.insert(key, ranks[0][0].replica_id.unique_id)
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        moved = self.charged.get(pending_request.metadata.internal_request_id) != replica_id.unique_id
        super().on_request_routed(pending_request, replica_id, result)
        key = _key(pending_request)
        if key and moved:  # not the first choice (that one was full): the table learns where it went
            self.table.insert(key, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self.table.drop(replica_id.unique_id)


class RoundRobinRouter(_Counting):
    """Each request to the next replica in turn: the baseline a plain load balancer gives."""

    def initialize_state(self, **kwargs):
        super().initialize_state()
        self.turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        i = next(self.turn) % len(ordered)
        ranks = _last([[r] for r in ordered[i:] + ordered[:i]], _avoid(pending_request))
        self.charge(pending_request, ranks)
        return ranks


ROUTER_CLASSES = {
    "prefix": PrefixAffinityRouter,
    "round-robin": RoundRobinRouter,
    "pow2": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
}
