"""Core attention through torch's scaled_dot_product_attention.

megatron-core's local DotProductAttention materialises the T x T score matrix; SDPA dispatches to flash or
memory-efficient kernels on GPU and to a fused kernel on CPU. It is a drop-in ``core_attention`` for
megatron-core's layer spec: same constructor and forward signature, [s, b, heads, head_dim] tensors.

Context parallelism (``parallel.cp`` > 1; megatron-core's own local attention refuses it, and torch's
context-parallel SDPA covers only the CUDA kernels): each rank holds the queries, keys and values of its two
chunks of every sequence (``gptscale.parallel.context``), and ``ContextParallelAttention`` runs them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from gptscale.parallel.context import future_mask, held_positions


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        **_unused,
    ):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
        if self.config.context_parallel_size > 1:
            return ContextParallelAttention.apply(query, key, value, attention_mask, self.softmax_scale)
        mask = None if attention_mask is None else _additive(attention_mask, query.dtype)
        dropout = self.dropout if self.training else 0.0
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            return _attend(query, key, value, mask, self.softmax_scale, dropout)


def _attend(query, key, value, mask: Optional[torch.Tensor], scale: float, dropout: float = 0.0) -> torch.Tensor:
    """SDPA of ``[s, b, heads, d]`` tensors (causal where ``mask`` is None); ``[s_q, b, heads * d]``."""
    seq, batch, heads, head_dim = query.shape
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale, enable_gqa=k.shape[1] != heads
    )
    return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)


def _additive(masked_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """megatron-core's boolean mask (True = masked out) as the additive mask (0 or -inf) SDPA turns a boolean
    one into, and saves for backward, at every call. Made once per mask and kept on it, so all layers of a
    micro-batch save one tensor, not a copy each (the mask is s x s, or s / cp x s, of the activation dtype)."""
    additive = getattr(masked_out, "_gptscale_additive", None)
    if additive is None or additive.dtype != dtype:
        additive = torch.zeros(masked_out.shape, dtype=dtype, device=masked_out.device)
        additive.masked_fill_(masked_out, float("-inf"))
        setattr(masked_out, "_gptscale_additive", additive)
    return additive


class ContextParallelAttention(torch.autograd.Function):
    """This rank's queries against the whole sequence's keys and values, all-gathered over the
    context-parallel group.

    Forward: keys and values are all-gathered and put back in sequence order, and one SDPA call runs this
    rank's queries with their rows of the causal mask, built here from positions, or of the document mask
    (``gptscale.train.step.attention_mask`` builds those rows once per micro-batch): query at position i
    sees key j where j <= i (and both lie in one document). Each query row
    sees all its keys at once, so its softmax is exact and nothing needs merging (a ring would merge partial
    results by their log-sum-exp instead).

    Backward: with S = softmax(q K^T * scale + mask) and O = S V, dQ needs only this rank's rows, while key
    j's gradient sums over every rank's queries, dK_j = sum_r sum_{i in r} dScores_ij q_i * scale (dV_j
    likewise with S_ij dO_i). Each rank computes its share for all keys, and a reduce-scatter sums the shares
    and hands each rank those of its own tokens. Only this rank's keys and values (and a document mask) are
    saved: backward gathers them again and reruns SDPA's forward for its gradients, so neither the whole
    sequence's keys and values nor an additive mask is held between forward and backward (Transformer
    Engine's all-gather CP saves the same way); the price is a second all-gather and an attention forward
    per layer. Attention dropout is refused under context parallelism (``config.check``): the rerun would
    draw other dropout masks.
    """

    @staticmethod
    def forward(ctx, query, key, value, masked_out, scale):
        ctx.save_for_backward(query, key, value, masked_out)
        ctx.scale = scale
        return _attend_chunks(query, *_whole_sequence(key, value), _allowed(masked_out, query), scale)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, masked_out = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (query, *_whole_sequence(key, value))]
            out = _attend_chunks(*leaves, _allowed(masked_out, query), ctx.scale)
            grad_query, grad_key, grad_value = torch.autograd.grad(out, leaves, grad_out)
        return (grad_query, *_own_shares(grad_key, grad_value), None, None)


def _attend_chunks(query, keys, values, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """This rank's two chunks of queries, each against the keys up to its own end: every later key lies in
    its future, so those scores, which a causal kernel would skip, are not computed (at cp=2 the chunks see
    1/4 and all, or 1/2 and 3/4, of the sequence: 5/8 of the scores against every key)."""
    cp, rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    chunk = query.shape[0] // 2
    outs = []
    for i, index in enumerate((rank, 2 * cp - 1 - rank)):
        rows, end = slice(i * chunk, (i + 1) * chunk), (index + 1) * chunk
        outs.append(_attend(query[rows], keys[:end], values[:end], allowed[..., rows, :end], scale))
    return torch.cat(outs)


def _allowed(masked_out: Optional[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
    """Which keys of the whole sequence this rank's queries see (True = attend): the document mask's rows
    (megatron-core's, True = masked out) or, without one, the causal mask's."""
    if masked_out is not None:
        return ~masked_out
    local = query.shape[0]
    cp, rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    return ~future_mask(held_positions(cp * local, cp, rank, query.device), cp * local)


def _gathered_positions(local: int, device: torch.device) -> torch.Tensor:
    """Sequence positions of the rows of an all-gather over the context-parallel group, rank by rank."""
    cp = parallel_state.get_context_parallel_world_size()
    return torch.cat([held_positions(cp * local, cp, rank, device) for rank in range(cp)])


def _whole_sequence(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keys and values of the whole sequence, gathered from the context-parallel ranks, in sequence order."""
    group = parallel_state.get_context_parallel_group()
    order = torch.argsort(_gathered_positions(key.shape[0], key.device))
    with torch.no_grad():
        return tuple(
            tensor_parallel.gather_from_sequence_parallel_region(t, group=group).index_select(0, order)
            for t in (key, value)
        )


def _own_shares(*grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Whole-sequence gradients (sequence order) summed over the context-parallel ranks, this rank's rows."""
    group = parallel_state.get_context_parallel_group()
    local = grads[0].shape[0] // group.size()
    positions = _gathered_positions(local, grads[0].device)
    return tuple(
        tensor_parallel.reduce_scatter_to_sequence_parallel_region(
            g.index_select(0, positions).contiguous(), group=group
        )
        for g in grads
    )
