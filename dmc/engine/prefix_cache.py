"""Prefix caching of the compressed state: a request whose feed starts with tokens an earlier request prefilled
starts from a copy of the cache row after them, and prefills only the rest.

vLLM shares a prompt's pages block by block because a block of keys depends on nothing after it. A DMC head's
state does not split that way: a merge rewrites the head's last slot, and the window ring (and with delayed merging
the raw delay ring) hold the open group, so the state after T tokens is kept whole. A *snapshot* is a cache row that
no request runs: a copy (:meth:`~dmc.engine.cache.PagedKVCache.fork_row`: pages, slot counts, window state, delay
ring) of a prefilling row taken right after its first T tokens, T a multiple of ``block``. Chunked prefill is exact
(the cache after tokens [0, T) then [T, n) is the cache after [0, n)), so a request started from a copy with
``seen = T`` leaves the cache it would have left prefilling everything: the outputs are the same, caching on or off.

Lookup hashes each block of ``block`` tokens with the hash of the block before (vLLM's chain), so the hash at T names
the whole prefix; a dict maps it to the snapshot, which keeps its tokens: a hash collision is never a wrong hit.
Snapshots are kept least recently used first; the scheduler evicts them (their rows closed, the pages freed) whenever
a request needs the pages or the rows (:meth:`dmc.engine.scheduler.Scheduler.evict_snapshot`). Snapshots take rows
that no request holds, so none is kept while ``max_num_seqs`` requests run.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .cache import PagedKVCache

PREFIX_BLOCK = 64  # tokens of a block: snapshots are taken at multiples of it


@dataclass
class Snapshot:
    """A parked cache row holding the state after exactly ``len(tokens)`` tokens."""

    row: int
    tokens: tuple[int, ...]
    pages: int  # pages its row holds: a copy of it takes as many


@dataclass
class PrefixCacheStats:
    """Counts since the engine started (or :meth:`PrefixCache.reset_stats`): requests admitted with the cache on,
    their feeds' tokens, the requests that started from a snapshot and the tokens they did not prefill."""

    queries: int = 0
    hits: int = 0
    queried_tokens: int = 0
    reused_tokens: int = 0
    parked: int = 0  # snapshots taken
    evicted: int = 0  # snapshots dropped for room (or cleared)

    @property
    def hit_rate(self) -> float:
        """Share of the admitted feeds' tokens that came from a snapshot (vLLM's prefix cache hit rate)."""
        return self.reused_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def summary(self, snapshots: int, pages: int) -> dict:
        """The counts, the hit rate and what the snapshots hold now, as plain values (metrics, /health)."""
        return {"queries": self.queries, "hits": self.hits, "queried_tokens": self.queried_tokens,
                "reused_tokens": self.reused_tokens, "hit_rate": self.hit_rate, "parked": self.parked,
                "evicted": self.evicted, "snapshots": snapshots, "snapshot_pages": pages}


def chain_hashes(ids: list[int], block: int, upto: int) -> list[int]:
    """The chain hash of each block boundary ``block, 2 block, ..., upto`` of ``ids``: a block's tokens hashed with
    the hash before, so equal hashes at T mean (but for collisions) equal first T tokens."""
    hashes, previous = [], None
    for end in range(block, upto + 1, block):
        previous = hash((previous, tuple(ids[end - block:end])))
        hashes.append(previous)
    return hashes


class PrefixCache:
    """Snapshots of prefilled rows of one :class:`PagedKVCache`, by the chain hash of the tokens they hold."""

    def __init__(self, cache: PagedKVCache, block: int = PREFIX_BLOCK) -> None:
        if block < 1:
            raise ValueError(f"the prefix cache's block must be >= 1 token, got {block}")
        self.cache, self.block = cache, block
        self.snapshots: OrderedDict[int, Snapshot] = OrderedDict()  # chain hash -> snapshot, least recent first
        self.stats = PrefixCacheStats()

    def boundary(self, feed_len: int) -> int:
        """The largest block boundary T <= feed_len - 1 (one token is left to give the next token's logits); 0:
        the feed is shorter than a block and one more token, it is never cached."""
        return (feed_len - 1) // self.block * self.block

    def lookup(self, feed: list[int]) -> Snapshot | None:
        """The snapshot of the longest prefix of ``feed`` (at most its :meth:`boundary`), marked as just used; None
        when there is none."""
        if not self.snapshots:
            return None
        hashes = chain_hashes(feed, self.block, self.boundary(len(feed)))
        for index in reversed(range(len(hashes))):
            snapshot = self.snapshots.get(hashes[index])
            if snapshot is not None and snapshot.tokens == tuple(feed[:(index + 1) * self.block]):
                self.snapshots.move_to_end(hashes[index])
                return snapshot
        return None

    def parks(self, feed: list[int], start: int) -> int:
        """Where a request whose feed is ``feed``, starting from ``start`` tokens already in its row, takes a
        snapshot: its feed's :meth:`boundary` when that is past ``start`` and not cached yet, else 0 (none)."""
        at = self.boundary(len(feed))
        if at <= start or self.holds(feed[:at]):
            return 0
        return at

    def holds(self, tokens: list[int]) -> bool:
        """Whether a snapshot after exactly these tokens exists."""
        snapshot = self.snapshots.get(chain_hashes(tokens, self.block, len(tokens))[-1]) if tokens else None
        return snapshot is not None and snapshot.tokens == tuple(tokens)

    def park(self, row: int, tokens: list[int], pages: int) -> None:
        """Keep ``row`` (a copy no request runs) as the snapshot after ``tokens`` (a whole number of blocks)."""
        key = chain_hashes(tokens, self.block, len(tokens))[-1]
        old = self.snapshots.pop(key, None)
        if old is not None:
            self.cache.close_row(old.row)
        self.snapshots[key] = Snapshot(row, tuple(tokens), pages)
        self.stats.parked += 1

    def record(self, feed_len: int, reused: int) -> None:
        """An admission with the cache on: ``reused`` of its ``feed_len`` tokens came from a snapshot."""
        stats = self.stats
        stats.queries += 1
        stats.queried_tokens += feed_len
        if reused:
            stats.hits += 1
            stats.reused_tokens += reused

    def evict_lru(self, keep: Snapshot | None = None) -> int:
        """Drop the least recently used snapshot other than ``keep`` (its row closed); returns the pages freed (0:
        there is none)."""
        key = next((k for k, s in self.snapshots.items() if s is not keep), None)
        if key is None:
            return 0
        snapshot = self.snapshots.pop(key)
        self.cache.close_row(snapshot.row)
        self.stats.evicted += 1
        return snapshot.pages

    def clear(self) -> int:
        """Drop every snapshot; returns how many there were."""
        count = len(self.snapshots)
        while self.evict_lru():
            pass
        return count

    def pages(self) -> int:
        """Pages the snapshots hold."""
        return sum(s.pages for s in self.snapshots.values())

    def summary(self) -> dict:
        return self.stats.summary(len(self.snapshots), self.pages())


def make_prefix_cache(enabled: bool, cache: PagedKVCache, *, eviction, forced_period: int) -> PrefixCache | None:
    """The engine's prefix cache (None when off); ValueError where a snapshot could not be copied exactly."""
    if not enabled:
        return None
    if eviction is not None:
        raise ValueError("enable_prefix_caching (--enable-prefix-caching) cannot run with the eviction baselines "
                         "(H2O, TOVA, SnapKV): their per-row slot scores are not copied with a row; drop one of them")
    if forced_period:
        raise ValueError("enable_prefix_caching (--enable-prefix-caching) is for real decisions; forced_period "
                         "(--forced-cr) benchmarks run without it")
    return PrefixCache(cache)
