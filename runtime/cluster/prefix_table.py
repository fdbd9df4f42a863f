"""Which replica holds which prompt prefix: the routing table of the prefix router, in pure
Python (no Ray), so it is tested alone.

A prompt is cut into BLOCK-character blocks; block i is known by a hash chained over blocks 0..i,
so a hash names a whole prefix. The table maps each prefix hash to the replicas that were sent a
prompt starting with it, and keeps at most `capacity` hashes (least recently used go first). A
replica's radix cache works on tokens and evicts on its own; the table approximates it by text,
which the router sees before tokenisation, the way Ray Serve LLM's prefix-aware router does.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

BLOCK = 64  # characters: ~16 tokens, fine enough for few-shot prefixes, coarse enough to stay small


def block_hashes(text: str, block: int = BLOCK) -> list[bytes]:
    """Chained hashes of the prompt's full blocks (a trailing partial block is not a shared prefix yet)."""
    out, h = [], b""
    for i in range(0, len(text) - block + 1, block):
        h = hashlib.blake2b(h + text[i:i + block].encode("utf-8", "surrogatepass"), digest_size=12).digest()
        out.append(h)
    return out


class PrefixTable:
    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self.owners: OrderedDict[bytes, set[str]] = OrderedDict()
        self.tenants: dict[str, int] = {}  # replica -> prefix hashes it holds (its share of the cache)

    def match(self, text: str, replicas: list[str]) -> dict[str, int]:
        """For each replica, how many leading blocks of text it was already sent."""
        matched = dict.fromkeys(replicas, 0)
        alive = set(replicas)
        for depth, h in enumerate(block_hashes(text), 1):
            owners = self.owners.get(h)
            alive &= owners if owners is not None else set()
            if not alive:
                break
            for r in alive:
                matched[r] = depth
        return matched

    def insert(self, text: str, replica: str) -> None:
        for h in block_hashes(text):
            owners = self.owners.get(h)
            if owners is None:
                owners = self.owners[h] = set()
            else:
                self.owners.move_to_end(h)
            if replica not in owners:
                owners.add(replica)
                self.tenants[replica] = self.tenants.get(replica, 0) + 1
        while len(self.owners) > self.capacity:
            _, owners = self.owners.popitem(last=False)
            for r in owners:
                self.tenants[r] -= 1

    def drop(self, replica: str) -> None:
        """A replica died: its cache went with it."""
        for owners in self.owners.values():
            owners.discard(replica)
        self.tenants.pop(replica, None)


def choose(table: PrefixTable, text: str | None, loads: dict[str, int], imbalance: int,
           ratio: float = 1.0, min_blocks: int = 1) -> list[list[str]]:
    """Ranked replicas for a request, best first, one per group (Ray tries each group in turn; a
    group of several would leave the pick to Ray's cached queue lengths, staler than `loads`):
    - queues imbalanced, the busiest by more than `imbalance` requests and `ratio` times the least
      loaded (SGLang's absolute and relative thresholds): least loaded first (the cache can wait).
      The ratio keeps a replica that is merely busier from taking another's prefixes (each one a
      prefill it need not have done, and a cache shared by more prefixes), while an idle
      replica still takes work;
    - else the replicas holding the longest prefix of the text (at least min_blocks blocks),
      least loaded first;
    - else, a new prefix: the replica holding the least of the table (as SGLang's cache-aware
      router picks the smallest tree), load breaking ties, so the prefixes spread evenly over the
      replicas' caches (the load is already within `imbalance`).
    The rest follow, least loaded first."""
    names = sorted(loads)
    by_load = sorted(names, key=lambda r: (loads[r], table.tenants.get(r, 0), r))
    busiest, least = max(loads.values()), min(loads.values())
    if not text or (busiest - least > imbalance and busiest > ratio * least):
        return [[r] for r in by_load]
    matched = table.match(text, names)
    best = max(matched.values())
    if best >= min_blocks:
        first = [r for r in by_load if matched[r] == best]
    else:
        first = [min(names, key=lambda r: (table.tenants.get(r, 0), loads[r], r))]
    return [[r] for r in first] + [[r] for r in by_load if r not in first]
