"""Orders of the waiting queue (--schedule-policy): fcfs, lpm, dfs-weight, priority.

lpm and dfs-weight look every waiting request up in the radix tree, so past LONG_QUEUE waiting
requests they fall back to fcfs: sorting must never cost more than it saves.

Request priorities come first under every policy once the waiting requests' priorities differ
(the policy orders requests of equal priority); `priority` orders by priority always, then by
arrival. The priority compared is the effective one (scheduler.py): waiting raises it, so a low
priority is never starved.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from arborlm.runtime.cache.radix_cache import RadixCache, TreeNode

POLICIES = ("fcfs", "lpm", "dfs-weight", "priority")
LONG_QUEUE = 128


def order_waiting(policy: str, waiting: list, tree: RadixCache, rank: Callable | None = None) -> list:
    """rank(req): a request's effective priority, higher first (None: priorities are ignored)."""
    if len(waiting) < 2:
        return waiting
    if rank is not None and (policy == "priority" or len({r.priority for r in waiting}) > 1):
        return sorted(_by_policy(policy, waiting, tree), key=lambda r: -rank(r))  # stable: policy among equals
    return _by_policy(policy, waiting, tree)


def _by_policy(policy: str, waiting: list, tree: RadixCache) -> list:
    if policy in ("fcfs", "priority") or tree.disable or len(waiting) > LONG_QUEUE:
        return waiting
    ends = {}
    for req in waiting:
        slots, node = tree.match_prefix(req.all_ids[: req.seq_len - 1])
        ends[req.rid] = (len(slots), node)
    if policy == "lpm":
        return sorted(waiting, key=lambda r: -ends[r.rid][0])  # stable: fcfs among equals
    if policy == "dfs-weight":
        return _dfs_weight(waiting, ends, tree.root)
    raise ValueError(f"schedule_policy: expected one of {POLICIES}, got {policy!r}")


def _dfs_weight(waiting, ends, root: TreeNode) -> list:
    """Visit the tree depth-first, heaviest subtree (most waiting requests) first, taking each
    node's requests after its subtree's (SGLang's order): requests sharing a prefix run together
    while it is cached, and requests with no match come last."""
    by_node = defaultdict(list)
    weight: dict[int, int] = defaultdict(int)
    for req in waiting:
        node = ends[req.rid][1]
        by_node[id(node)].append(req)
        while node is not None:
            weight[id(node)] += 1
            node = node.parent
    out = []
    stack = [(root, False)]
    while stack:  # iterative post-order
        node, expanded = stack.pop()
        if expanded:
            out.extend(by_node.get(id(node), ()))
            continue
        stack.append((node, True))
        kids = [c for c in node.children.values() if weight.get(id(c))]
        stack.extend((c, False) for c in sorted(kids, key=lambda c: weight[id(c)]))  # heaviest first
    return out
