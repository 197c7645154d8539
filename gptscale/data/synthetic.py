"""Random tokens for benchmarks: the loader interface of ``StreamingLoader`` without reading or tokenizing.

One step's micro-batches are drawn once and served in turn, so timing sees no data work at all. Random
tokens cost the model exactly what text does (nanoGPT's benchmark uses them too); the loss stays near
ln(vocab), so they say nothing about learning.
"""

from __future__ import annotations

import torch

from gptscale.config.layout import Layout


class SyntheticTokens:
    """Iterator of ``{"tokens", "labels", "loss_mask", "position_ids"}`` micro-batches, cycling through one step."""

    def __init__(self, vocab_size: int, seq_len: int, layout: Layout, seed: int):
        generator = torch.Generator().manual_seed(seed)
        pin = torch.cuda.is_available()
        self.batches = []
        for _ in range(layout.num_microbatches):
            windows = torch.randint(vocab_size, (layout.micro_batch, seq_len + 1), generator=generator)
            batch = {
                "tokens": windows[:, :-1].contiguous(),
                "labels": windows[:, 1:].contiguous(),
                "loss_mask": torch.ones(layout.micro_batch, seq_len),
                "position_ids": torch.arange(seq_len).expand(layout.micro_batch, -1).contiguous(),
            }
            self.batches.append({name: t.pin_memory() if pin else t for name, t in batch.items()})
        self.micro_step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.batches[self.micro_step % len(self.batches)]
        self.micro_step += 1
        return batch

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step}

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = int(state["micro_step"])
