"""Micro-batches for one data-parallel rank, from an in-memory token array, resumable.

The global batch of optimizer step ``s`` is always samples ``s*G .. s*G+G-1`` of a seeded shuffle of
fixed-length windows, whatever the layout: data-parallel ranks and accumulation micro-steps only divide
it differently. So 1 rank and TP2 x DP2 see the same tokens per step.
"""

from __future__ import annotations

import numpy as np
import torch

from gptscale.config.validate import Layout


class WindowLoader:
    """Iterator of ``{"tokens", "labels", "loss_mask", "position_ids"}`` micro-batches for ``dp_rank``."""

    def __init__(self, tokens: np.ndarray, seq_len: int, layout: Layout, dp_rank: int, seed: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.layout = layout
        self.dp_rank = dp_rank
        self.seed = seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < layout.global_batch:
            raise ValueError(
                f"the corpus holds {len(tokens)} tokens: fewer than one global batch "
                f"({layout.global_batch} sequences of train.seq_len={seq_len} tokens)"
            )
        self.consumed_samples = 0  # samples of completed optimizer steps
        self.micro_step = 0
        self._epoch, self._order = -1, None

    def _window(self, sample: int) -> np.ndarray:
        epoch, index = divmod(sample, self.num_windows)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        start = int(self._order[index]) * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        lay = self.layout
        first = self.consumed_samples + (self.micro_step * lay.dp + self.dp_rank) * lay.micro_batch
        windows = np.stack([self._window(first + i) for i in range(lay.micro_batch)]).astype(np.int64)
        self.micro_step += 1
        if self.micro_step == lay.num_microbatches:
            self.micro_step = 0
            self.consumed_samples += lay.global_batch
        windows = torch.from_numpy(windows)
        return {
            "tokens": windows[:, :-1],
            "labels": windows[:, 1:],
            "loss_mask": torch.ones(lay.micro_batch, self.seq_len),
            "position_ids": torch.arange(self.seq_len).expand(lay.micro_batch, -1),
        }

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "micro_step": self.micro_step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self.micro_step = int(state["micro_step"])
        self.seed = int(state["seed"])
