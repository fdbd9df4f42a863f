import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arborlm.runtime.cache.memory_pool import ReqToTokenPool, SlotAllocator, TokenToKVPool


def test_alloc_never_hands_out_a_slot_twice():
    a = SlotAllocator(10)
    x, y = a.alloc(4), a.alloc(6)
    assert sorted(torch.cat([x, y]).tolist()) == list(range(1, 11))
    assert a.alloc(1) is None
    a.free(x)
    assert sorted(a.alloc(4).tolist()) == sorted(x.tolist())


def test_alloc_too_many_changes_nothing():
    a = SlotAllocator(5)
    assert a.alloc(6) is None
    assert a.available() == 5


def test_double_free_and_out_of_range_raise():
    a = SlotAllocator(5)
    x = a.alloc(2)
    a.free(x)
    with pytest.raises(RuntimeError, match="twice"):
        a.free(x)
    with pytest.raises(ValueError):
        a.free(torch.tensor([0]))  # the reserved padding slot
    y = a.alloc(2)
    with pytest.raises(RuntimeError, match="twice"):
        a.free(torch.cat([y, y[:1]]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 8)), max_size=60))
def test_random_alloc_free_keeps_slots_disjoint(ops):
    a = SlotAllocator(32)
    held: list[torch.Tensor] = []
    for is_alloc, n in ops:
        if is_alloc or not held:
            s = a.alloc(n)
            if s is not None:
                held.append(s)
        else:
            a.free(held.pop(n % len(held)))
        owned = torch.cat(held).tolist() if held else []
        assert len(set(owned)) == len(owned)  # never handed out twice
        assert a.available() + len(owned) == 32
        assert not set(owned) & set(a.free_slots.tolist())
    for s in held:
        a.free(s)
    assert a.available() == 32


def test_kv_pool_write_and_bytes():
    pool = TokenToKVPool(8, num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    slots = pool.alloc(3)
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    pool.write(1, slots, k, v)
    assert torch.equal(pool.k_buffer[1][slots], k) and torch.equal(pool.v_buffer[1][slots], v)
    assert TokenToKVPool.bytes_per_token(30, 3, 64, torch.bfloat16) == 2 * 30 * 3 * 64 * 2


def test_req_to_token_rows():
    pool = ReqToTokenPool(2, 16)
    r0, r1 = pool.alloc(), pool.alloc()
    assert {r0, r1} == {0, 1} and pool.alloc() is None
    pool.free(r0)
    with pytest.raises(RuntimeError):
        pool.free(r0)
