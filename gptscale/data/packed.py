"""Fine-tuning data: whole conversations packed into sequences, each token's loss mask from the shards.

Pretraining data is a token stream cut into windows; a conversation cut that way would lose its prompt or
its answer, so fine-tuning data (``gptscale-sft/1``) is served by whole documents instead:

- **Epoch order**: shards in a seeded order, each shard's documents in a seeded order (as for pretraining).
- **Packing**: next-fit over that order from the manifest's document lengths: a sequence (seq_len + 1
  tokens: inputs and shifted labels) takes documents while they fit. ``data.packing=false`` gives each
  document a sequence of its own, padded. The epoch's sequences fill global batches of G slots; the last
  batch of an epoch is topped up with empty sequences.
- **Long documents**: longer than a sequence, a document is cut to fit (``data.truncate_long``), dropped
  (``data.on_error=skip``) or refused (``raise``, the error names shard and document); counted and logged.

Everything is a pure function of the seed, the epoch and the lengths, so every rank computes the same
batches without reading, data-parallel rank r serves slots [r*G/dp, (r+1)*G/dp) of each, and the state is
the step: a run resumes at any layout with the same global batch and sequence length. Packed documents
attend only to themselves and their positions restart (the ``reset_attention_at_eod`` path, always on
here); a label from the next document is never trained.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
import zstandard

from gptscale.config.layout import Layout
from gptscale.data.batch import masked_micro_batch
from gptscale.data.loader import Source
from gptscale.data.manifest import DataError, Manifest
from gptscale.data.shards import LoadedShard, load_shard

log = logging.getLogger("gptscale")

SPLIT_SEEDS = {"train": 0, "val": 1}
STATE_FORMAT = "packed/1"
CACHED_SHARDS = 4


class PackedOrder:
    """Which documents (shard, index, tokens taken) fill each slot of each global batch."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        seq_len: int,
        slots: int,
        seed: int,
        packing: bool,
        truncate_long: bool,
        on_error: str,
    ):
        self.shards = manifest.shards(split)
        self.window = seq_len + 1
        self.slots, self.packing = slots, packing
        self.seed = (seed, SPLIT_SEEDS[split])
        self.lengths = [np.asarray(shard.lengths, dtype=np.int64) for shard in self.shards]
        long = [(s, int(d)) for s, lengths in enumerate(self.lengths) for d in np.flatnonzero(lengths > self.window)]
        if long and not truncate_long and on_error != "skip":
            shard, document = long[0]
            raise DataError(
                f"{manifest.url(self.shards[shard].name)}: document {document} holds {self.lengths[shard][document]} "
                f"tokens, more than a sequence (train.seq_len + 1 = {self.window}); {len(long)} in the {split} split "
                "are: cut them with data.truncate_long=true or drop them with data.on_error=skip"
            )
        self.taken = [
            np.minimum(lengths, self.window) if truncate_long else np.where(lengths > self.window, 0, lengths)
            for lengths in self.lengths
        ]
        if long:
            log.warning(
                "%s (%s split): %d documents longer than train.seq_len + 1 = %d tokens %s",
                manifest.location,
                split,
                len(long),
                self.window,
                "cut to fit" if truncate_long else "dropped (data.on_error=skip)",
            )
        self.long_documents = len(long)
        self._epochs: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self._steps: list[int] = []  # global batches of each epoch packed so far

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The epoch's sequences, each an array of (shard, document, tokens) rows."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.popitem(last=False)
            self._epochs[epoch] = self._pack(epoch)
        return self._epochs[epoch]

    def _pack(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([*self.seed, epoch])
        rows = []
        for shard in rng.permutation(len(self.shards)):
            documents = np.random.default_rng([*self.seed, epoch, int(shard)]).permutation(len(self.lengths[shard]))
            taken = self.taken[shard][documents]
            keep = taken > 0
            rows.append(np.stack([np.full(int(keep.sum()), shard), documents[keep], taken[keep]], axis=1))
        documents = np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)
        if not self.packing:
            return [documents[i : i + 1] for i in range(len(documents))]
        sequences, start, fill = [], 0, 0
        for index, tokens in enumerate(documents[:, 2]):
            if fill + tokens > self.window:
                sequences.append(documents[start:index])
                start, fill = index, 0
            fill += int(tokens)
        if start < len(documents):
            sequences.append(documents[start:])
        return sequences

    def steps_in(self, epoch: int) -> int:
        while len(self._steps) <= epoch:
            self._steps.append(math.ceil(len(self.epoch(len(self._steps))) / self.slots))
        return self._steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within it) of global step ``step``."""
        epoch = 0
        while step >= self.steps_in(epoch):
            step -= self.steps_in(epoch)
            epoch += 1
        return epoch, step

    def sequence(self, slot: int, step: int) -> np.ndarray:
        """The documents of slot ``slot`` at global step ``step`` (none: an epoch's closing empty sequence)."""
        epoch, within = self.locate(step)
        sequences = self.epoch(epoch)
        index = within * self.slots + slot
        return sequences[index] if index < len(sequences) else np.zeros((0, 3), dtype=np.int64)


class PackedLoader:
    """Iterator of ``{"tokens", "labels", "loss_mask", "position_ids"[, "document_ids"]}`` micro-batches of
    fine-tuning data; the interface and state of ``StreamingLoader``."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        layout: Layout,
        dp_rank: int,
        seq_len: int,
        *,
        seed: int,
        packing: bool = True,
        truncate_long: bool = False,
        on_error: str = "raise",
        serves_tokens: bool = True,
    ):
        if manifest.shards(split) and not manifest.masked:
            raise DataError(f"{manifest.location} is not fine-tuning data (format {manifest.format})")
        self.manifest, self.split, self.layout, self.seq_len = manifest, split, layout, seq_len
        self.seed, self.packing, self.on_error = seed, packing, on_error
        self.serves_tokens = serves_tokens or packing
        self.order = PackedOrder(manifest, split, seq_len, layout.global_batch, seed, packing, truncate_long, on_error)
        if not self.order.steps_in(0):
            raise DataError(f"{manifest.location} ({split} split) holds no document that fits a sequence")
        self.eod = manifest.eod
        per_rank = layout.global_batch // layout.dp
        self.slots = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        self.step, self.micro_step = 0, 0
        self.skipped_shards = 0
        self._fields: Optional[dict] = None
        self._shards: OrderedDict[int, Optional[LoadedShard]] = OrderedDict()
        self._decompressor = zstandard.ZstdDecompressor()

    @property
    def fingerprint(self) -> str:
        """The same identity of the data as a pretraining source's, so resume checks treat both alike."""
        return Source(self.manifest, self.split, 1.0).fingerprint

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._fields is None:
            self._fields = self._read_step(self.step)
        rows = slice(self.micro_step * self.layout.micro_batch, (self.micro_step + 1) * self.layout.micro_batch)
        fields = {name: value[rows] for name, value in self._fields.items()}
        batch = masked_micro_batch(fields["windows"], fields["valid"], fields["trained"], self.eod, self.packing)
        self.micro_step += 1
        if self.micro_step == self.layout.num_microbatches:
            self.micro_step, self._fields = 0, None
            self.step += 1
        return batch

    def _read_step(self, step: int) -> dict[str, torch.Tensor]:
        shape = (len(self.slots), self.seq_len + 1)
        windows = np.full(shape, self.eod, dtype=np.int64)
        valid = np.zeros(shape, dtype=bool)
        trained = np.zeros(shape, dtype=bool)
        if self.serves_tokens:
            for row, slot in enumerate(self.slots):
                at = 0
                for shard, document, tokens in self.order.sequence(slot, step):
                    loaded = self._shard(int(shard))
                    if loaded is not None:
                        windows[row, at : at + tokens] = loaded.decode(
                            int(document), self.manifest.numpy_dtype, self._decompressor
                        )[:tokens]
                        trained[row, at : at + tokens] = loaded.decode_mask(int(document), self._decompressor)[:tokens]
                        valid[row, at : at + tokens] = True
                    at += tokens
        return {
            "windows": torch.from_numpy(windows),
            "valid": torch.from_numpy(valid),
            "trained": torch.from_numpy(trained),
        }

    def _shard(self, index: int) -> Optional[LoadedShard]:
        """A verified shard, kept while recent (documents are read in shard order); None if skipped."""
        if index in self._shards:
            self._shards.move_to_end(index)
            return self._shards[index]
        info = self.manifest.shards(self.split)[index]
        try:
            loaded = load_shard(self.manifest.url(info.name), info, self.manifest.numpy_dtype)
            if loaded.masks is None:
                raise DataError(
                    f"shard {self.manifest.url(info.name)} has no loss masks, yet the manifest says "
                    f"{self.manifest.format}"
                )
        except DataError as error:
            if self.on_error != "skip":
                raise
            self.skipped_shards += 1
            log.warning("skipping shard (data.on_error=skip; its documents are masked): %s", error)
            loaded = None
        self._shards[index] = loaded
        if len(self._shards) > CACHED_SHARDS:
            self._shards.popitem(last=False)
        return loaded

    def close(self) -> None:
        self._shards.clear()

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "micro_step": self.micro_step,
            "seed": self.seed,
            "global_batch": self.layout.global_batch,
            "seq_len": self.seq_len,
            "packing": self.packing,
            "micro_batch": self.layout.micro_batch,
            "dp": self.layout.dp,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batches ``state`` had served (any number of ranks)."""
        if state.get("format") != STATE_FORMAT:
            raise DataError("cannot resume fine-tuning data from the state of a pretraining data stream")
        for name, value in (
            ("global_batch", self.layout.global_batch),
            ("seq_len", self.seq_len),
            ("packing", self.packing),
            ("seed", self.seed),
            ("fingerprint", self.fingerprint),
        ):
            if state[name] != value:
                raise DataError(
                    f"cannot resume the data stream: it was saved with {name}={state[name]}, "
                    f"this run has {value} (the order depends on it)"
                )
        if state["micro_step"] and (state["micro_batch"], state["dp"]) != (self.layout.micro_batch, self.layout.dp):
            raise DataError("cannot resume the data stream inside a step on another layout")
        self.step, self.micro_step, self._fields = int(state["step"]), int(state["micro_step"]), None
