"""Reads the tokens of picked sequences from shards, loading each shard once and fetching the next ahead.

A reader serves a set of slots; each slot (per source) holds the shard it last read. A shard stays in
memory while some slot holds it, and the shard after it in the epoch order is fetched by a background
thread when a slot nears the end of its current one, so remote shards arrive before they are needed.
With ``on_error=skip`` a shard that cannot be verified, or a document that does not decompress, becomes
masked padding (loss mask 0) in place, so the order of everything else is unchanged; each is counted and
logged once.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Hashable, Optional

import numpy as np
import zstandard

from gptscale.data.manifest import DataError, ShardInfo
from gptscale.data.order import Pick, SourceOrder
from gptscale.data.shards import LoadedShard, load_shard

log = logging.getLogger("gptscale")

PREFETCH_AT = 0.75  # fetch the next shard once a slot has read this share of its current one


@dataclass(frozen=True)
class ShardSource:
    """Where one source's shards are: their URLs and manifest entries."""

    urls: list[str]
    infos: list[ShardInfo]
    dtype: np.dtype


@dataclass
class _Shard:
    loaded: Optional[LoadedShard]  # None: skipped under on_error=skip
    epochs: dict = field(default_factory=dict)  # epoch -> (document order, token offset of each document)


class SequenceReader:
    def __init__(
        self, sources: list[ShardSource], orders: list[SourceOrder], on_error: str, excluded: frozenset = frozenset()
    ):
        self.sources = sources
        self.excluded = excluded  # (source, shard, document) read as empty documents (``data/exclude.py``)
        self.orders = orders
        self.on_error = on_error
        # Shards and documents skipped, and the tokens of the shards opened and skipped, since ``take_skipped``.
        self.skipped: Counter = Counter()
        self.total_skipped: Counter = Counter()
        self._shards: dict[tuple[int, int], _Shard | Future] = {}
        self._refs: Counter = Counter()
        self._held: dict[Hashable, tuple[int, int]] = {}
        self._last_doc: dict[Hashable, tuple[tuple, np.ndarray]] = {}
        self._bad_docs: set = set()
        self._decompressor = zstandard.ZstdDecompressor()
        self._fetcher: Optional[ThreadPoolExecutor] = None

    def take_skipped(self) -> Counter:
        skipped, self.skipped = self.skipped, Counter()
        return skipped

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=True, cancel_futures=True)

    def read(self, slot: int, pick: Pick, tokens: np.ndarray, valid: np.ndarray, seen: Optional[list] = None) -> None:
        """Fill ``tokens`` (length seq_len + 1) with the picked sequence; ``valid`` marks real tokens.
        ``seen``: gets the (source, shard, document) of every document the sequence touches."""
        if pick.sequence is None:
            return
        order = self.orders[pick.source]
        holder = (slot, pick.source)
        start, stop = order.token_range(pick.sequence)
        shard_order, shard_starts = order.shards(pick.epoch)
        position = int(np.searchsorted(shard_starts, start, side="right")) - 1
        written = 0
        while start < stop:
            shard_start, shard_stop = int(shard_starts[position]), int(shard_starts[position + 1])
            end = min(stop, shard_stop)
            if end > start:
                shard = int(shard_order[position])
                self._copy(
                    holder, pick, shard, start - shard_start, end - shard_start, tokens[written:], valid[written:], seen
                )
                written += end - start
                start = end
                if end - shard_start > PREFETCH_AT * (shard_stop - shard_start):
                    self._prefetch_next(pick, slot, position)
            position += 1

    def _copy(
        self,
        holder,
        pick: Pick,
        shard: int,
        start: int,
        stop: int,
        tokens: np.ndarray,
        valid: np.ndarray,
        seen: Optional[list] = None,
    ) -> None:
        """Tokens [start, stop) of a shard's epoch stream into the front of ``tokens``."""
        entry = self._hold(holder, (pick.source, shard))
        if entry.loaded is None:
            return
        if pick.epoch not in entry.epochs:
            count = len(entry.loaded.lengths)
            documents = self.orders[pick.source].documents(pick.epoch, shard, count)
            offsets = np.concatenate([[0], np.cumsum(entry.loaded.lengths[documents])])
            for old in [epoch for epoch in entry.epochs if epoch < pick.epoch - 1]:
                del entry.epochs[old]
            entry.epochs[pick.epoch] = (documents, offsets)
        documents, offsets = entry.epochs[pick.epoch]
        index = int(np.searchsorted(offsets, start, side="right")) - 1
        written = 0
        while start < stop:
            document = int(documents[index])
            doc_start, doc_stop = int(offsets[index]), int(offsets[index + 1])
            end = min(stop, doc_stop)
            if end > start:
                if seen is not None:
                    seen.append((pick.source, shard, document))
                array = self._document(holder, pick.source, shard, document, entry.loaded)
                if array is not None and (pick.source, shard, document) in self.excluded:
                    # An empty document in its place: only its end-of-document token, which starts the next.
                    if start <= doc_stop - 1 < end:
                        tokens[written + doc_stop - 1 - start] = array[-1]
                        valid[written + doc_stop - 1 - start] = True
                elif array is not None:
                    tokens[written : written + end - start] = array[start - doc_start : end - doc_start]
                    valid[written : written + end - start] = True
                written += end - start
                start = end
            index += 1

    def _document(self, holder, source: int, shard: int, document: int, loaded: LoadedShard) -> Optional[np.ndarray]:
        key = (source, shard, document)
        cached = self._last_doc.get(holder)
        if cached is not None and cached[0] == key:
            return cached[1]
        if key in self._bad_docs:
            return None
        try:
            array = loaded.decode(document, self.sources[source].dtype, self._decompressor)
        except DataError as error:
            if self.on_error != "skip":
                raise
            self._bad_docs.add(key)
            self._count_skip("documents", f"skipping a document (data.on_error=skip): {error}")
            return None
        self._last_doc[holder] = (key, array)
        return array

    def _hold(self, holder, key: tuple[int, int]) -> _Shard:
        """The shard ``key``, now held by ``holder``; the shard it held before is dropped if nobody holds it."""
        previous = self._held.get(holder)
        if previous != key:
            self._held[holder] = key
            self._refs[key] += 1
            if previous is not None:
                self._refs[previous] -= 1
                if self._refs[previous] <= 0:
                    del self._refs[previous]
                    self._shards.pop(previous, None)
        entry = self._shards.get(key)
        if entry is None:
            entry = self._load(key)
        elif isinstance(entry, Future):
            entry = self._settle(key, entry)
        self._shards[key] = entry
        return entry

    def _load(self, key: tuple[int, int]) -> _Shard:
        future: Future = Future()
        try:
            future.set_result(self._fetch(key))
        except Exception as error:
            future.set_exception(error)
        return self._settle(key, future)

    def _fetch(self, key: tuple[int, int]) -> LoadedShard:
        source, shard = key
        info = self.sources[source]
        return load_shard(info.urls[shard], info.infos[shard], info.dtype)

    def _settle(self, key: tuple[int, int], future: Future) -> _Shard:
        tokens = self.sources[key[0]].infos[key[1]].tokens
        self.skipped["opened_tokens"] += tokens
        try:
            return _Shard(future.result())
        except DataError as error:
            if self.on_error != "skip":
                raise
            self.skipped["skipped_tokens"] += tokens
            self._count_skip("shards", f"skipping shard (data.on_error=skip; its tokens are masked): {error}")
            return _Shard(None)

    def _count_skip(self, what: str, message: str) -> None:
        self.skipped[what] += 1
        self.total_skipped[what] += 1
        log.warning(
            "%s [skipped by this reader so far: %d shards, %d documents]",
            message,
            self.total_skipped["shards"],
            self.total_skipped["documents"],
        )

    def _prefetch_next(self, pick: Pick, slot: int, position: int) -> None:
        """Start fetching the shard after ``position`` if this slot's lane goes on into it."""
        order = self.orders[pick.source]
        shard_order, shard_starts = order.shards(pick.epoch)
        first, length = order.lane(slot)
        lane_stop = order.token_range(first + length - 1)[1] if length else 0
        if position + 1 >= len(shard_order) or shard_starts[position + 1] >= lane_stop:
            return
        key = (pick.source, int(shard_order[position + 1]))
        if key in self._shards:
            return
        if self._fetcher is None:
            self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gptscale-shards")
        self._shards[key] = self._fetcher.submit(self._fetch, key)
