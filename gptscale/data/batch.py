"""From packed token windows to the tensors the model takes: inputs, labels, loss mask, positions, mask.

Documents are packed back to back with an end-of-document token between them. By default attention runs
across document boundaries and positions count from the window's start (GPT-2/3 practice). With
``data.reset_attention_at_eod`` each document sees only itself: positions restart after every
end-of-document token and ``attention_mask`` is block-diagonal causal, ``[b, 1, s, s]`` bool with True =
masked out, which is megatron-core's convention.
"""

from __future__ import annotations

import torch


def window_fields(windows: torch.Tensor, valid: torch.Tensor, eod: int, reset_attention: bool) -> dict:
    """Per-sequence fields of ``windows`` ([n, seq_len + 1] token ids) that are costly to compute."""
    fields = {"windows": windows, "loss_mask": (valid[:, :-1] & valid[:, 1:]).float()}
    if reset_attention:
        fields["position_ids"], fields["attention_mask"] = document_positions_and_mask(windows[:, :-1], eod)
    return fields


def document_positions_and_mask(tokens: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting at every document, and the block-diagonal causal mask (True = masked)."""
    n, length = tokens.shape
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eod
    index = torch.arange(length).expand(n, -1)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    documents = starts.cumsum(dim=1)
    future = torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)
    mask = (documents[:, :, None] != documents[:, None, :]) | future
    return index - last_start, mask[:, None]


def micro_batch(fields: dict, rows: slice, seq_len: int) -> dict[str, torch.Tensor]:
    """The model's inputs for ``rows`` of a step's sequences."""
    windows = fields["windows"][rows]
    batch = {
        "tokens": windows[:, :-1],
        "labels": windows[:, 1:],
        "loss_mask": fields["loss_mask"][rows],
        "position_ids": fields["position_ids"][rows] if "position_ids" in fields
        else torch.arange(seq_len).expand(len(windows), -1),
    }
    if "attention_mask" in fields:
        batch["attention_mask"] = fields["attention_mask"][rows]
    return batch
