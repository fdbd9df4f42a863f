"""Orders of the waiting queue (--schedule-policy): fcfs, lpm, dfs-weight.

lpm and dfs-weight look every waiting request up in the radix tree, so past LONG_QUEUE waiting
requests they fall back to fcfs: sorting must never cost more than it saves.
"""

from __future__ import annotations

from collections import defaultdict

from arborlm.runtime.cache.radix_cache import RadixCache, TreeNode

POLICIES = ("fcfs", "lpm", "dfs-weight")
LONG_QUEUE = 128


def order_waiting(policy: str, waiting: list, tree: RadixCache) -> list:
    if policy == "fcfs" or tree.disable or len(waiting) > LONG_QUEUE or len(waiting) < 2:
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
