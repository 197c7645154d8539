"""Micro-batches of one data-parallel rank, streamed from token shards, resumable exactly.

The global batch of step s is slot 0..G-1's pick at step s (``gptscale.data.order``), whatever the layout.
Data-parallel rank r serves the contiguous slots [r*G/dp, (r+1)*G/dp) and cuts them into its
micro-batches; loader workers each read a contiguous share of those slots and hand over one item per step,
which the rank stitches back together in slot order. So a different number of ranks, micro-batch size or
workers divides the same tokens differently, and the state is just the step: it is the same on every rank
and resumes on any layout with the same global batch and sequence length.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gptscale.config.layout import Layout
from gptscale.data.batch import micro_batch
from gptscale.data.exclude import DocumentId
from gptscale.data.manifest import DataError, Manifest
from gptscale.data.order import GlobalOrder, SourceOrder
from gptscale.data.reader import SequenceReader, ShardSource

SPLIT_SEEDS = {"train": 0, "val": 1}
SKIP_COUNTS = ("shards", "documents", "opened_tokens", "skipped_tokens")  # what a reader counts per step
STATE_FORMAT = 1


@dataclass(frozen=True)
class Source:
    """One split of one prepared dataset, with its blending weight."""

    manifest: Manifest
    split: str
    weight: float

    @property
    def fingerprint(self) -> str:
        """Identity of the data itself (not where it lives), so a moved dataset still resumes."""
        digest = hashlib.sha256()
        for shard in self.manifest.shards(self.split):
            digest.update(f"{shard.name}:{shard.sha256}\n".encode())
        return digest.hexdigest()[:16]

    def shard_source(self) -> ShardSource:
        shards = self.manifest.shards(self.split)
        return ShardSource([self.manifest.url(s.name) for s in shards], shards, self.manifest.numpy_dtype)


class _StepStream(IterableDataset):
    """One item per step from ``start``: the sequences of this worker's share of the rank's slots."""

    def __init__(
        self,
        sources: list[Source],
        orders: list[SourceOrder],
        slots: range,
        start: int,
        seq_len: int,
        eod: int,
        on_error: str,
        excluded: frozenset = frozenset(),
    ):
        self.shard_sources = [source.shard_source() for source in sources]
        self.weights = [source.weight for source in sources]
        self.orders, self.slots, self.start, self.seq_len = orders, slots, start, seq_len
        self.eod, self.on_error, self.excluded = eod, on_error, excluded

    def __iter__(self):
        worker = get_worker_info()
        slots = self.slots
        if worker is not None:
            slots = np.array_split(np.arange(slots.start, slots.stop), worker.num_workers)[worker.id]
        order = GlobalOrder(self.orders, self.weights)
        reader = SequenceReader(self.shard_sources, self.orders, self.on_error, self.excluded)
        try:
            for step in itertools.count(self.start):
                # numpy, not torch, for the per-step arrays: torch's threaded fills stall on a busy machine.
                windows = np.full((len(slots), self.seq_len + 1), self.eod, dtype=np.int64)
                valid = np.zeros(windows.shape, dtype=bool)
                for row, slot in enumerate(slots):
                    reader.read(int(slot), order.pick(int(slot), step), windows[row], valid[row])
                skipped = reader.take_skipped()
                yield {
                    "windows": torch.from_numpy(windows),
                    "valid": torch.from_numpy(valid),
                    "skipped": torch.tensor([skipped[name] for name in SKIP_COUNTS]),
                }
        finally:
            reader.close()


class StreamingLoader:
    """Iterator of ``{"tokens", "labels", "loss_mask", "position_ids"[, "document_ids"]}`` micro-batches.

    ``serves_tokens=False`` (pipeline stages that neither embed tokens nor compute the loss) yields
    placeholders of the right shapes without reading anything, while keeping the same state.
    """

    def __init__(
        self,
        sources: list[Source],
        layout: Layout,
        dp_rank: int,
        seq_len: int,
        *,
        seed: int,
        workers: int = 0,
        reset_attention_at_eod: bool = False,
        on_error: str = "raise",
        max_skipped_fraction: Optional[float] = None,
        serves_tokens: bool = True,
        exclude: tuple = (),
    ):
        self.sources, self.layout, self.seq_len = sources, layout, seq_len
        self.workers, self.reset_attention, self.on_error = workers, reset_attention_at_eod, on_error
        self.serves_tokens = serves_tokens
        self.eod = sources[0].manifest.eod
        per_rank = layout.global_batch // layout.dp
        self.slots = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        self.step = 0  # global batches fully handed out
        self.micro_step = 0
        self.skipped: Counter = Counter()  # shards and documents skipped under on_error=skip, for the logs
        self.tokens: Counter = Counter()  # tokens of the shards opened and of those skipped
        self.max_skipped_fraction = max_skipped_fraction
        self._stream = None
        self._fields = None
        self._set_seed(seed)
        self.fingerprints = [source.fingerprint for source in sources]
        self.configured = {i for i in exclude if i.fingerprint in self.fingerprints}  # data.exclude
        self.excluded: set[DocumentId] = set(self.configured)

    def _set_seed(self, seed: int) -> None:
        self.seed = seed
        self.orders = []
        for index, source in enumerate(self.sources):
            shards = source.manifest.shards(source.split)
            order = SourceOrder(
                [s.tokens for s in shards],
                self.seq_len,
                self.layout.global_batch,
                (seed, SPLIT_SEEDS[source.split], index),
            )
            if order.sequences < self.layout.global_batch:
                raise DataError(
                    f"{source.manifest.location} ({source.split} split) holds {order.tokens} tokens, "
                    f"{order.sequences} sequences of train.seq_len={self.seq_len}: fewer than one global batch "
                    f"(parallel.global_batch={self.layout.global_batch})"
                )
            self.orders.append(order)
        self.order = GlobalOrder(self.orders, [source.weight for source in self.sources])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._fields is None:
            self._fields = self._next_step()
        rows = slice(self.micro_step * self.layout.micro_batch, (self.micro_step + 1) * self.layout.micro_batch)
        batch = micro_batch(self._fields["windows"][rows], self._fields["valid"][rows], self.eod, self.reset_attention)
        self.micro_step += 1
        if self.micro_step == self.layout.num_microbatches:
            self.micro_step, self._fields = 0, None
            self.step += 1
        return batch

    def _next_step(self) -> dict[str, torch.Tensor]:
        if not self.serves_tokens:
            return {
                "windows": torch.zeros(len(self.slots), self.seq_len + 1, dtype=torch.int64),
                "valid": torch.zeros(len(self.slots), self.seq_len + 1, dtype=torch.bool),
            }
        if self._stream is None:
            self._stream = self._open(self.step)
        items = [next(self._stream) for _ in range(max(self.workers, 1))]
        skipped = torch.stack([item.pop("skipped") for item in items]).sum(dim=0)
        counts = dict(zip(SKIP_COUNTS, skipped.tolist()))  # a host tensor: one read, no device wait
        self.skipped.update(shards=counts["shards"], documents=counts["documents"])
        self.tokens.update(opened=counts["opened_tokens"], skipped=counts["skipped_tokens"])
        self._check_skipped()
        if len(items) == 1:
            return items[0]
        return {name: torch.cat([item[name] for item in items]) for name in items[0]}

    def _check_skipped(self) -> None:
        """Stop when skipped shards hold more than ``data.max_skipped_fraction`` of the tokens read: a run whose
        every shard is bad would otherwise train on masked padding (loss 0) without a word."""
        skipped, opened = self.tokens["skipped"], self.tokens["opened"]
        if self.max_skipped_fraction is not None and skipped and skipped > self.max_skipped_fraction * opened:
            raise DataError(
                f"data.on_error=skip has skipped {self.skipped['shards']} shards, {skipped:,} of the "
                f"{opened:,} tokens this rank opened ({skipped / opened:.1%}), more than "
                f"data.max_skipped_fraction={self.max_skipped_fraction}: the warnings above name the "
                "shards; repair or re-prepare them (or raise the bound)"
            )

    def _open(self, start: int):
        stream = _StepStream(
            self.sources, self.orders, self.slots, start, self.seq_len, self.eod, self.on_error, self._excluded_keys()
        )
        if self.workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.workers))

    def close(self) -> None:
        """Stop the loader's workers (they also stop when the loader is garbage-collected)."""
        if hasattr(self._stream, "close"):
            self._stream.close()
        self._stream = None

    def state_dict(self) -> dict:
        """Where the stream stands; identical on every rank, so any rank's copy resumes any layout."""
        progress = self.order.progress(self.step)
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "micro_step": self.micro_step,
            "seed": self.seed,
            "global_batch": self.layout.global_batch,
            "seq_len": self.seq_len,
            "micro_batch": self.layout.micro_batch,
            "dp": self.layout.dp,
            "sources": [
                {
                    "location": s.manifest.location,
                    "split": s.split,
                    "fingerprint": s.fingerprint,
                    "weight": s.weight,
                    **done,
                }
                for s, done in zip(self.sources, progress)
            ],
            "exclude": [str(identity) for identity in sorted(self.excluded)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batches ``state`` had served (any number of ranks or workers)."""
        mine = [(s.fingerprint, float(s.weight)) for s in self.sources]
        theirs = [(s["fingerprint"], float(s["weight"])) for s in state["sources"]]
        for name, value in (("global_batch", self.layout.global_batch), ("seq_len", self.seq_len)):
            if int(state[name]) != value:
                raise DataError(
                    f"cannot resume the data stream: it was saved with {name}={state[name]}, "
                    f"this run has {value} (the global order depends on it)"
                )
        if int(state["micro_step"]) and (state["micro_batch"], state["dp"]) != (
            self.layout.micro_batch,
            self.layout.dp,
        ):
            raise DataError(
                "cannot resume the data stream inside a step on another layout: it was saved at "
                f"micro-step {state['micro_step']} of dp={state['dp']} x micro_batch={state['micro_batch']}"
            )
        if mine != theirs:
            raise DataError(
                f"cannot resume the data stream: it was saved for sources {state['sources']}, "
                f"this run reads {[s.manifest.location for s in self.sources]} with other data or weights"
            )
        self.close()
        if int(state["seed"]) != self.seed:
            self._set_seed(int(state["seed"]))
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])
        self._fields = None
        saved = {DocumentId.parse(text, "the loader state's exclusion list") for text in state.get("exclude", [])}
        self.excluded = self.configured | saved

    def exclude(self, identities) -> list[DocumentId]:
        """Exclude more documents from the next step on (those of other sources are ignored); returns the new."""
        new = sorted({i for i in identities if i.fingerprint in self.fingerprints} - self.excluded)
        if new:
            self.excluded |= set(new)
            self.close()
            self._fields = None
        return new

    def _excluded_keys(self) -> frozenset:
        """The exclusions as the reader's (source, shard, document) keys."""
        shard_index = [{shard.name: i for i, shard in enumerate(s.manifest.shards(s.split))} for s in self.sources]
        return frozenset(
            (source, shard_index[source][identity.shard], identity.document)
            for identity in self.excluded
            for source, fingerprint in enumerate(self.fingerprints)
            if identity.fingerprint == fingerprint
        )

    def documents_at(self, step: int) -> list[DocumentId]:
        """The documents that global batch ``step`` (0-based) reads, in every slot of every rank: the order is a
        pure function of the step, so any rank can name them. Already excluded ones are left out."""
        reader = SequenceReader([source.shard_source() for source in self.sources], self.orders, self.on_error)
        seen: list = []
        try:
            windows = np.zeros(self.seq_len + 1, dtype=np.int64)
            valid = np.zeros(self.seq_len + 1, dtype=bool)
            for slot in range(self.layout.global_batch):
                reader.read(slot, self.order.pick(slot, step), windows, valid, seen)
        finally:
            reader.close()
        names = [[shard.name for shard in s.manifest.shards(s.split)] for s in self.sources]
        found = {
            DocumentId(self.fingerprints[source], names[source][shard], document) for source, shard, document in seen
        }
        return sorted(found - self.excluded)
