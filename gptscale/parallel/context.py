"""Context parallelism: which tokens of a sequence this rank holds.

Each sequence is cut into 2 x cp equal chunks and context-parallel rank r holds chunks r and 2 x cp - 1 - r.
Under a causal mask a token attends to the tokens before it, so a late chunk costs more than an early one;
pairing the i-th chunk from the front with the i-th from the back gives every rank the same work (Megatron's
and Transformer Engine's split, which megatron-core's rotary embedding also assumes).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state


def held_positions(seq_len: int, cp: int, cp_rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions in the sequence (0 .. seq_len - 1) of the tokens ``cp_rank`` holds, in the order it holds them."""
    chunk = seq_len // (2 * cp)
    starts = (cp_rank * chunk, (2 * cp - 1 - cp_rank) * chunk)
    return torch.cat([torch.arange(start, start + chunk, device=device) for start in starts])


def this_rank_positions(seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """``held_positions`` of this process's context-parallel rank."""
    return held_positions(
        seq_len, parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank(), device
    )


def split_batch(batch: dict) -> dict:
    """This rank's tokens of every ``[b, s]`` tensor of a micro-batch, except ``document_ids``, which stays
    whole: the attention mask of this rank's queries needs the documents of every key."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    positions = this_rank_positions(batch["tokens"].shape[1], batch["tokens"].device)
    return {
        name: tensor if name == "document_ids" else tensor.index_select(1, positions) for name, tensor in batch.items()
    }


def future_mask(queries: torch.Tensor, length: int) -> torch.Tensor:
    """``[q, length]`` bool, True where the key lies after the query: the causal mask's rows for the tokens at
    positions ``queries``."""
    return torch.arange(length, device=queries.device) > queries.unsqueeze(1)
