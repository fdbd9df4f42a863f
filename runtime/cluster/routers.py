"""Ray Serve request routers for the replica deployment (--router prefix | round-robin; pow2 is
Ray's own PowerOfTwoChoicesRequestRouter).

A router lives in the process that holds the replicas' handle: the ingress replica (one per
application here), so its table and load counts see every request and need no actor. It reads the
routing key from the handle call's first argument (app.Routed.key: the prompt text, or None).
Load is this router's own count of requests in flight per replica (routed, not yet completed).
"""

from __future__ import annotations

import itertools
from collections import defaultdict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from arborlm.runtime.cluster.prefix_table import PrefixTable, choose


class _Counting(RequestRouter):
    """Counts each replica's requests in flight from the routed / completed hooks."""

    def initialize_state(self, **kwargs):
        self.inflight: dict[str, int] = defaultdict(int)
        self.routed: dict[str, str] = {}  # internal request id -> replica, for the requests this router placed

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.inflight[replica_id.unique_id] += 1
        self.routed[pending_request.metadata.internal_request_id] = replica_id.unique_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Also called for calls this router never placed (broadcasts): only ours count."""
        rid = self.routed.pop(internal_request_id, None)
        if rid is not None:
            self.inflight[rid] = max(self.inflight[rid] - 1, 0)

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
    queues are imbalanced by more than `imbalance` requests (prefix_table.choose)."""

    def initialize_state(self, imbalance: int = 8, capacity: int = 200_000, **kwargs):
        super().initialize_state()
        self.table = PrefixTable(capacity)
        self.imbalance = imbalance
        self.chosen: dict[str, str] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: self.inflight[rid] for rid in by_id}
        ranks = choose(self.table, _key(pending_request), loads, self.imbalance)
        return _last([[by_id[rid] for rid in rank] for rank in ranks], _avoid(pending_request))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        key = _key(pending_request)
        if key:
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
        return _last([[r] for r in ordered[i:] + ordered[:i]], _avoid(pending_request))


ROUTER_CLASSES = {
    "prefix": PrefixAffinityRouter,
    "round-robin": RoundRobinRouter,
    "pow2": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
}
