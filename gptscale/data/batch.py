"""From packed token windows to the tensors the model takes: inputs, labels, loss mask, positions, documents.

Documents are packed back to back with an end-of-document token between them. By default attention runs
across document boundaries and positions count from the window's start (GPT-2/3 practice). With
``data.reset_attention_at_eod`` each document sees only itself: positions restart after every
end-of-document token and the loader adds ``document_ids`` (each token's document within its sequence).
The block-diagonal causal mask megatron-core takes (``[b, 1, s, s]`` bool, True = masked out) is s x s
bytes a sequence, s times the tokens themselves, so it is not shipped from the loader:
``document_attention_mask`` builds it where the step runs, on the device.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from gptscale.parallel.context import future_mask


def micro_batch(windows: torch.Tensor, valid: torch.Tensor, eod: int, reset_attention: bool) -> dict:
    """The model's inputs from ``windows`` ([b, seq_len + 1] token ids) and ``valid`` (real, not padding)."""
    tokens = windows[:, :-1]
    batch = {"tokens": tokens, "labels": windows[:, 1:], "loss_mask": (valid[:, :-1] & valid[:, 1:]).float()}
    if reset_attention:
        batch["position_ids"], batch["document_ids"] = document_positions(tokens, eod)
    else:
        batch["position_ids"] = torch.arange(tokens.shape[1]).expand(len(tokens), -1)
    return batch


def document_positions(tokens: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting at every document, and each token's document index within its sequence."""
    tokens = tokens.numpy()
    length = tokens.shape[1]
    starts = np.ones(tokens.shape, dtype=bool)
    starts[:, 1:] = tokens[:, :-1] == eod
    index = np.arange(length)
    document_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    document_ids = np.cumsum(starts, axis=1, dtype=np.int32) - 1
    return torch.from_numpy(index - document_start), torch.from_numpy(document_ids)


def document_attention_mask(document_ids: torch.Tensor, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-diagonal causal mask, ``[b, 1, q, s]`` bool, True where a token may not attend.

    ``queries``: the positions of the rows (context parallelism: the tokens this rank holds); all by default.
    """
    length = document_ids.shape[1]
    queries = torch.arange(length, device=document_ids.device) if queries is None else queries
    other_document = torch.ne(document_ids[:, queries].unsqueeze(2), document_ids.unsqueeze(1))
    return other_document.logical_or_(future_mask(queries, length)).unsqueeze(1)


def masked_micro_batch(
    windows: torch.Tensor, valid: torch.Tensor, trained: torch.Tensor, eod: int, keep_apart: bool
) -> dict:
    """``micro_batch`` of fine-tuning data: only labels the shards' masks train count, and never a label
    that starts the next document (the end-of-document token predicts nothing)."""
    batch = micro_batch(windows, valid, eod, keep_apart)
    batch["loss_mask"] *= (trained[:, 1:] & (windows[:, :-1] != eod)).float()
    return batch
