"""From packed token windows to the tensors the model takes: inputs, labels, loss mask, positions, mask.

Documents are packed back to back with an end-of-document token between them. By default attention runs
across document boundaries and positions count from the window's start (GPT-2/3 practice). With
``data.reset_attention_at_eod`` each document sees only itself: positions restart after every
end-of-document token and ``attention_mask`` is block-diagonal causal, ``[b, 1, s, s]`` bool with True =
masked out, which is megatron-core's convention. The mask is built per micro-batch, when it is needed:
at s x s bytes a sequence it is by far the largest thing the loader makes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def micro_batch(windows: torch.Tensor, valid: torch.Tensor, eod: int, reset_attention: bool) -> dict:
    """The model's inputs from ``windows`` ([b, seq_len + 1] token ids) and ``valid`` (real, not padding)."""
    tokens = windows[:, :-1]
    batch = {"tokens": tokens, "labels": windows[:, 1:], "loss_mask": (valid[:, :-1] & valid[:, 1:]).float()}
    if reset_attention:
        batch["position_ids"], batch["attention_mask"] = document_positions_and_mask(tokens, eod)
    else:
        batch["position_ids"] = torch.arange(tokens.shape[1]).expand(len(tokens), -1)
    return batch


def document_positions_and_mask(tokens: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting at every document, and the block-diagonal causal mask (True = masked).

    The mask is the causal mask plus, for the rows of each document, the columns before it: one copy of a
    cached causal mask and one block fill per document, since writing s x s bytes is what it costs.
    """
    tokens = tokens.numpy()
    n, length = tokens.shape
    starts = np.ones((n, length), dtype=bool)
    starts[:, 1:] = tokens[:, :-1] == eod
    index = np.arange(length)
    document_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    mask = np.repeat(_future(length)[None, None], n, axis=0)
    for row in range(n):
        first_tokens = np.flatnonzero(starts[row]).tolist()
        for begin, end in zip(first_tokens, first_tokens[1:] + [length]):
            mask[row, 0, begin:end, :begin] = True
    return torch.from_numpy(index - document_start), torch.from_numpy(mask)


@functools.lru_cache(maxsize=4)
def _future(length: int) -> np.ndarray:
    return np.triu(np.ones((length, length), dtype=bool), k=1)
