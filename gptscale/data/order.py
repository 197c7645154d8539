"""The global order: which tokens fill each slot of each global batch, as a pure function of the step.

Every rank computes the same order from the manifests, the seed, the global batch and the sequence length;
nothing depends on the number of data-parallel ranks or loader workers, which only decide who reads what.
That is what makes resumption exact and lets a run resume on another number of ranks or workers.

- **Epoch stream** of a source: its shards in a seeded order, each shard's documents in a seeded order,
  concatenated. Sequence ``k`` of the epoch is its tokens ``[k*T, k*T + T + 1)`` (T = seq_len; the stride
  of T makes every token except the first a label exactly once). Q sequences per epoch; the last one is
  padded.
- **Slots and lanes**: a global batch has G slots (G = parallel.global_batch). The epoch's sequences are cut
  into G contiguous lanes of K = ceil(Q / G) sequences; the last ``G*K - Q`` lanes hold K - 1 and serve
  one empty (fully masked) sequence at the epoch's last step. Slot p reads lane p one sequence per pick,
  so a rank holding slots [a, b) reads one contiguous stretch of each epoch: data parallel ranks and
  loader workers split the reading as well as the batch.
- **Blending**: slot p's n-th pick comes from source ``schedule[p + n]``, where ``schedule`` is the greedy
  sequence that keeps every prefix closest to the weights (Megatron's blending rule). Each slot therefore
  takes each source at its weight, and each global batch (G consecutive entries) mixes sources by weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


class SourceOrder:
    """The epoch streams of one source (one split of one dataset) and their lanes."""

    def __init__(self, shard_tokens: list[int], seq_len: int, slots: int, seed: tuple[int, ...]):
        self.shard_tokens = np.asarray(shard_tokens, dtype=np.int64)
        self.seq_len = seq_len
        self.slots = slots
        self.seed = seed
        self.tokens = int(self.shard_tokens.sum())
        self.sequences = max(math.ceil((self.tokens - 1) / seq_len), 0)
        self.rows = math.ceil(self.sequences / slots)  # picks per slot per epoch
        self.short_lanes = slots * self.rows - self.sequences
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def lane(self, slot: int) -> tuple[int, int]:
        """First sequence and number of sequences of lane ``slot`` (the same every epoch)."""
        long_lanes = self.slots - self.short_lanes
        start = slot * self.rows - max(0, slot - long_lanes)
        return start, self.rows - (slot >= long_lanes)

    def sequence(self, slot: int, row: int) -> Optional[int]:
        """Index in the epoch of the ``row``-th sequence of lane ``slot``; None for a short lane's last row."""
        start, length = self.lane(slot)
        return start + row if row < length else None

    def token_range(self, sequence: int) -> tuple[int, int]:
        start = sequence * self.seq_len
        return start, min(start + self.seq_len + 1, self.tokens)

    def shards(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard indices in the epoch's order, and the token offset where each starts (plus the total)."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 4:  # slots differ by a few picks at most, so by an epoch or two
                self._epochs.pop(min(self._epochs))
            order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.shard_tokens))
            starts = np.concatenate([[0], np.cumsum(self.shard_tokens[order])])
            self._epochs[epoch] = (order, starts)
        return self._epochs[epoch]

    def documents(self, epoch: int, shard: int, count: int) -> np.ndarray:
        """The order of a shard's documents in an epoch."""
        return np.random.default_rng([*self.seed, epoch, shard]).permutation(count)


class BlendSchedule:
    """Which source each pick of each slot comes from; slot p's n-th pick is ``source(p + n)``."""

    def __init__(self, weights: list[float]):
        total = float(sum(weights))
        self.weights = np.asarray(weights, dtype=np.float64) / total
        self._picks = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros((1, len(weights)), dtype=np.int64)  # picks per source before index i

    def _extend(self, length: int) -> None:
        if length <= len(self._picks):
            return
        length = max(length, 2 * len(self._picks), 1024)
        picks = np.empty(length, dtype=np.int64)
        picks[: len(self._picks)] = self._picks
        counts = np.empty((length + 1, len(self.weights)), dtype=np.int64)
        counts[: len(self._counts)] = self._counts
        taken = counts[len(self._picks)].astype(np.float64)
        for index in range(len(self._picks), length):
            source = int(np.argmax(self.weights * (index + 1) - taken))
            taken[source] += 1
            picks[index] = source
            counts[index + 1] = taken
        self._picks, self._counts = picks, counts

    def source(self, index: int) -> int:
        if len(self.weights) == 1:
            return 0
        self._extend(index + 1)
        return int(self._picks[index])

    def taken(self, slot: int, step: int) -> np.ndarray:
        """Picks slot ``slot`` made from each source during its first ``step`` picks."""
        if len(self.weights) == 1:
            return np.array([step], dtype=np.int64)
        self._extend(slot + step + 1)
        return self._counts[slot + step] - self._counts[slot]


@dataclass(frozen=True)
class Pick:
    source: int
    epoch: int
    sequence: Optional[int]  # index in the epoch; None: an empty (fully masked) sequence


class GlobalOrder:
    """The sources' orders and the blend: what slot p holds at step s."""

    def __init__(self, sources: list[SourceOrder], weights: list[float]):
        self.sources = sources
        self.blend = BlendSchedule(weights)

    def pick(self, slot: int, step: int) -> Pick:
        source = self.blend.source(slot + step)
        order = self.sources[source]
        epoch, row = divmod(int(self.blend.taken(slot, step)[source]), order.rows)
        return Pick(source, epoch, order.sequence(slot, row))

    def progress(self, step: int) -> list[dict]:
        """Per source: sequences served and the oldest epoch any slot is still in, for the state and logs."""
        slots = self.sources[0].slots
        taken = np.stack([self.blend.taken(slot, step) for slot in range(slots)])
        return [
            {"sequences": int(taken[:, i].sum()), "epoch": int((taken[:, i] // order.rows).min())}
            for i, order in enumerate(self.sources)
        ]
