"""RadixCache against a reference model, with random operation sequences (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arborlm.runtime.cache.memory_pool import SlotAllocator
from arborlm.runtime.cache.radix_cache import RadixCache

POOL = 1000


def test_match_split_and_cached_counts():
    alloc = SlotAllocator(100)
    tree = RadixCache(alloc.free)
    a = [1, 2, 3, 4, 5]
    sa = alloc.alloc(5)
    assert tree.insert(a, sa) == 0
    slots, node = tree.match_prefix([1, 2, 3, 9])
    assert slots.tolist() == sa[:3].tolist() and node.key == [1, 2, 3]  # split inside the edge
    sb = alloc.alloc(6)
    b = [1, 2, 3, 7, 8, 9]
    assert tree.insert(b, sb) == 3  # 3 leading tokens were already there
    alloc.free(sb[:3])
    assert tree.match_prefix(b)[0].tolist() == sa[:3].tolist() + sb[3:].tolist()
    assert tree.evictable_size == 8 and tree.protected_size == 0
    _, leaf = tree.match_prefix(a)
    tree.lock(leaf)
    assert tree.protected_size == 5 and tree.evictable_size == 3
    assert tree.evict(100) == 3  # only the unlocked branch goes
    assert tree.match_prefix(a)[0].tolist() == sa.tolist()
    assert tree.match_prefix(b)[0].numel() == 3
    tree.unlock(leaf)
    assert tree.evict(100) == 5 and alloc.available() == 100


def test_lru_order():
    alloc = SlotAllocator(100)
    tree = RadixCache(alloc.free)
    for seq in ([1, 1], [2, 2], [3, 3]):
        tree.insert(seq, alloc.alloc(2))
    tree.match_prefix([1, 1])  # touch: now [2, 2] is the oldest
    tree.evict(1)
    assert tree.match_prefix([2, 2])[0].numel() == 0
    assert tree.match_prefix([1, 1])[0].numel() == 2 and tree.match_prefix([3, 3])[0].numel() == 2


def test_disabled_cache_never_shares():
    alloc = SlotAllocator(10)
    tree = RadixCache(alloc.free, disable=True)
    s = alloc.alloc(3)
    tree.cache_finished([1, 2, 3], s, 0, tree.root)
    assert alloc.available() == 10 and tree.match_prefix([1, 2, 3])[0].numel() == 0


seqs = st.lists(st.integers(0, 3), min_size=1, max_size=12)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("run"), seqs),  # a request: match, lock, extend, insert (finish)
        st.tuples(st.just("hold"), seqs),  # a request that stays running (locked) until "release"
        st.tuples(st.just("release"), st.integers(0, 10)),
        st.tuples(st.just("evict"), st.integers(1, 30)),
        st.tuples(st.just("match"), seqs),
    ),
    max_size=50,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_operations_against_reference(operations):
    alloc = SlotAllocator(POOL)
    tree = RadixCache(alloc.free)
    ref: dict[tuple, int] = {}  # token prefix -> slot of its last token, as first cached
    held = []  # (tokens, slots, node) of running requests

    def check_match(tokens, slots):
        for i, s in enumerate(slots.tolist()):
            assert ref[tuple(tokens[: i + 1])] == s  # matches are correct

    def start(tokens):
        slots, node = tree.match_prefix(tokens)
        check_match(tokens, slots)
        tree.lock(node)
        n = len(slots)
        new = alloc.alloc(len(tokens) - n)
        if new is None:
            tree.evict(len(tokens) - n)
            new = alloc.alloc(len(tokens) - n)
        all_slots = torch.cat([slots, new])
        return tokens, all_slots, n, node

    def finish(tokens, all_slots, n, node):
        dup = tree.insert(tokens, all_slots)
        for i in range(dup, len(tokens)):
            ref.setdefault(tuple(tokens[: i + 1]), all_slots[i].item())
        alloc.free(all_slots[n:dup])
        tree.unlock(node)

    def in_use():
        return sum(len(t) - n for t, _, n, _ in held)

    for op, arg in operations:
        if op == "run":
            finish(*start(arg))
        elif op == "hold":
            held.append(start(arg))
        elif op == "release" and held:
            finish(*held.pop(arg % len(held)))
        elif op == "evict":
            tree.evict(arg)
            ref = {k: v for k, v in ref.items() if tree.match_prefix(list(k))[0].numel() == len(k)}
        elif op == "match":
            slots, _ = tree.match_prefix(arg)
            check_match(arg, slots)
            # without eviction the match would be the longest cached prefix
            longest = max((i for i in range(1, len(arg) + 1) if tuple(arg[:i]) in ref), default=0)
            assert len(slots) == longest
        # locked prefixes are never evicted
        for tokens, slots, n, _ in held:
            assert tree.match_prefix(tokens[:n])[0].tolist() == slots[:n].tolist()
        # free + cached + in-use always equal the pool size
        assert alloc.available() + tree.evictable_size + tree.protected_size + in_use() == POOL
        assert tree.evictable_size + tree.protected_size == tree.total_size()
    while held:
        finish(*held.pop())
    assert tree.protected_size == 0
    tree.evict(POOL)
    assert alloc.available() == POOL and tree.total_size() == 0  # no slot leaks
