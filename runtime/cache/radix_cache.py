"""Radix-tree prefix cache over token ids; each node holds the KV slots of its edge's tokens.

Requests share KV through it: a new request matches its longest cached prefix and prefills only
the rest. Nodes in use are locked (reference counts along the path to the root) and never
evicted; unlocked leaves are evicted least-recently-used first, cascading to parents that become
unlocked leaves. Token counts are kept exactly:

    pool free slots + evictable + protected + slots owned by requests == pool size

`disable=True` keeps the same interface but never shares: match finds nothing, insert frees.
"""

from __future__ import annotations

import heapq
import itertools

import torch


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, parent: "TreeNode | None" = None, key=(), value: torch.Tensor | None = None):
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key: list[int] = list(key)
        self.value = value if value is not None else torch.empty(0, dtype=torch.int64)
        self.lock_ref = 0
        self.last_access = 0


def _common_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class RadixCache:
    def __init__(self, free_slots_fn, disable: bool = False):
        """`free_slots_fn(tensor)` returns slots to the pool (the KV allocator's free)."""
        self.free_slots = free_slots_fn
        self.disable = disable
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Forget everything (the caller frees the pool as a whole)."""
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable_size = 0
        self.protected_size = 0
        self.evicted_tokens = 0  # counter, for metrics and tests

    # ---- lookup and insertion -------------------------------------------------------------
    def match_prefix(self, tokens: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """Longest cached prefix of `tokens`: its slots and the node where it ends.

        A match ending inside a node splits it, so the returned node covers the match exactly.
        """
        if self.disable or not tokens:
            return torch.empty(0, dtype=torch.int64), self.root
        node, values, i = self.root, [], 0
        now = next(self._clock)
        node.last_access = now
        while i < len(tokens) and tokens[i] in node.children:
            child = node.children[tokens[i]]
            n = _common_len(child.key, tokens[i:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            node, i = child, i + n
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return slots, node

    def insert(self, tokens: list[int], slots: torch.Tensor) -> int:
        """Add a sequence's KV. Returns how many leading tokens were already cached: the caller's
        slots for those are duplicates and the caller must free them (the tree keeps its own)."""
        if self.disable:
            return 0
        node, i = self.root, 0
        now = next(self._clock)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                new = TreeNode(node, tokens[i:], slots[i:].clone())
                new.last_access = now
                node.children[tokens[i]] = new
                self.evictable_size += len(new.key)
                return i
            n = _common_len(child.key, tokens[i:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node, i = child, i + n
        return i

    # ---- the ownership protocol used by the scheduler --------------------------------------
    def cache_finished(self, tokens: list[int], slots: torch.Tensor, protected_len: int, node: TreeNode) -> None:
        """A request ends: the tree takes its KV (duplicates are freed) and the request's lock goes.

        slots[:protected_len] are the tree's own (matched at admission, locked at `node`)."""
        if self.disable:
            self.free_slots(slots)
            return
        dup = self.insert(tokens, slots)
        self.free_slots(slots[protected_len:dup])
        self.unlock(node)

    def cache_unfinished(self, tokens: list[int], slots: torch.Tensor, protected_len: int,
                         node: TreeNode) -> tuple[torch.Tensor, TreeNode]:
        """A running request shares the KV it has so far. Returns the slots it must now use (the
        tree's, where it already had the same tokens) and the node its lock moved to."""
        if self.disable:
            return slots, node
        dup = self.insert(tokens, slots)
        self.free_slots(slots[protected_len:dup])
        new_slots, new_node = self.match_prefix(tokens)
        self.lock(new_node)
        self.unlock(node)
        return new_slots, new_node

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child`'s edge after n tokens; return the new upper node."""
        upper = TreeNode(child.parent, child.key[:n], child.value[:n])
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        child.parent.children[child.key[0]] = upper
        child.key, child.value = child.key[n:], child.value[n:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    # ---- locking ----------------------------------------------------------------------------
    def lock(self, node: TreeNode) -> None:
        """Protect the path root..node from eviction (a request is using that prefix)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 1:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "unlock without lock"
            node = node.parent

    # ---- eviction -----------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots from unlocked leaves, LRU first; return how many were freed."""
        heap = [(n.last_access, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            self.free_slots(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            self.evicted_tokens += len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _leaves(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            if not node.children and node is not self.root:
                yield node
            stack.extend(node.children.values())

    def total_size(self) -> int:
        return sum(len(n.key) for n in self._nodes())

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
