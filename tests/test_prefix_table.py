"""The prefix router's table (runtime/cluster/prefix_table.py), without Ray."""

from arborlm.runtime.cluster.prefix_table import BLOCK, PrefixTable, block_hashes, choose

PREFIXES = [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(60)) + "\n" for i in range(4)]


def test_block_hashes_name_whole_prefixes():
    a, b = "x" * 200, "x" * 130 + "y" * 70
    ha, hb = block_hashes(a), block_hashes(b)
    assert len(ha) == 200 // BLOCK and ha[:2] == hb[:2] and ha[2] != hb[2]
    assert block_hashes("short") == []


def test_match_insert_and_drop():
    t = PrefixTable()
    t.insert(PREFIXES[0] + "Q1", "A")
    t.insert(PREFIXES[1] + "Q1", "B")
    m = t.match(PREFIXES[0] + "another question", ["A", "B"])
    assert m["A"] == len(block_hashes(PREFIXES[0])) and m["B"] == 0
    t.drop("A")
    assert t.match(PREFIXES[0] + "Q", ["A", "B"]) == {"A": 0, "B": 0} and "A" not in t.tenants


def test_capacity_evicts_least_recently_used():
    t = PrefixTable(capacity=4)
    t.insert("a" * BLOCK * 3, "A")
    t.insert("b" * BLOCK * 3, "B")
    assert len(t.owners) == 4 and t.tenants["A"] + t.tenants["B"] == 4
    assert t.match("b" * BLOCK * 3, ["A", "B"])["B"] == 3


def test_choose_prefers_the_cache_then_balance():
    t = PrefixTable()
    t.insert(PREFIXES[0], "A")
    assert choose(t, PREFIXES[0] + "Q", {"A": 2, "B": 0}, imbalance=4)[0] == ["A"]  # cached, load close enough
    assert choose(t, PREFIXES[0] + "Q", {"A": 6, "B": 0}, imbalance=4)[0] == ["B"]  # imbalanced: least loaded
    assert choose(t, PREFIXES[1] + "Q", {"A": 0, "B": 0}, imbalance=4)[0] == ["B"]  # new prefix: fewest tenants
    assert choose(t, PREFIXES[1] + "Q", {"A": 0, "B": 3}, imbalance=4)[0] == ["B"]  # even when busier, within bounds
    t.insert(PREFIXES[1], "B")
    assert choose(t, PREFIXES[2] + "Q", {"A": 3, "B": 2}, imbalance=4)[0] == ["B"]  # equal shares: least loaded
    assert choose(t, None, {"A": 1, "B": 0}, imbalance=4) == [["B"], ["A"]]


def test_replicas_sharing_a_prefix_rank_by_load():
    """A prefix cached on both: the less loaded one goes first, alone in its group."""
    t = PrefixTable()
    t.insert(PREFIXES[0], "A")
    t.insert(PREFIXES[0], "B")
    assert choose(t, PREFIXES[0] + "Q", {"A": 3, "B": 1}, imbalance=8) == [["B"], ["A"]]
    assert choose(t, PREFIXES[0] + "Q", {"A": 0, "B": 1}, imbalance=8) == [["A"], ["B"]]


def test_a_busier_replica_keeps_its_prefixes_an_idle_one_takes_work():
    """Both thresholds must hold (SGLang's absolute and relative): 12 vs 4 is busier, not imbalanced."""
    t = PrefixTable()
    t.insert(PREFIXES[0], "A")
    assert choose(t, PREFIXES[0] + "Q", {"A": 12, "B": 4}, imbalance=8, ratio=3)[0] == ["A"]
    assert choose(t, PREFIXES[0] + "Q", {"A": 13, "B": 3}, imbalance=8, ratio=3)[0] == ["B"]
    assert choose(t, PREFIXES[0] + "Q", {"A": 9, "B": 0}, imbalance=8, ratio=3)[0] == ["B"]
