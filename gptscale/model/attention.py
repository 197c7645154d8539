"""Core attention through torch's scaled_dot_product_attention.

megatron-core's local DotProductAttention materialises the T x T score matrix; SDPA dispatches to flash or
memory-efficient kernels on GPU and to a fused kernel on CPU. It is a drop-in ``core_attention`` for
megatron-core's layer spec: same constructor and forward signature, [s, b, heads, head_dim] tensors.

Under context parallelism (``parallel.cp`` > 1; megatron-core's own local attention refuses it, and torch's
context-parallel SDPA covers only the CUDA kernels) each rank holds the queries, keys and values of its two
chunks of every sequence (``gptscale.parallel.context``). Keys and values are all-gathered over the
context-parallel group and put back in sequence order, and one SDPA call runs this rank's queries against the
whole sequence, with the mask rows of its queries (``gptscale.train.step.attention_mask`` builds them once per
micro-batch): query at position i sees key j where j <= i (and both lie in one document). Every query row then sees all its keys at once, so its
softmax is exact and nothing needs merging (a ring would merge partial results by their log-sum-exp instead).
Backward: key j's gradient is the sum over every rank's queries, dK_j = sum_r sum_{i in r} dS_ij q_i; each rank
computes its share for all keys and a reduce-scatter sums the shares and hands each rank those of its own
tokens (megatron-core's all-gather/reduce-scatter pair). The price is one all-gather of K and V per layer and
the whole sequence's K and V held per rank, which is small next to the queries' activations under
grouped-query attention.
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

from gptscale.parallel.context import held_positions


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

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
        seq, batch, heads, head_dim = query.shape
        mask = None if attention_mask is None else ~attention_mask  # megatron: True = masked out
        if self.config.context_parallel_size > 1:
            if mask is None:
                raise ValueError("context parallelism needs the attention mask rows of this rank's tokens")
            key, value = _whole_sequence(key, value)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dropout = self.dropout if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != heads,
            )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)



def _whole_sequence(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the whole sequence, gathered from the context-parallel ranks, in sequence order."""
    group = parallel_state.get_context_parallel_group()
    cp = group.size()
    length = cp * key.shape[0]
    gathered = torch.cat([held_positions(length, cp, rank, key.device) for rank in range(cp)])
    order = torch.argsort(gathered)
    key, value = (tensor_parallel.gather_from_sequence_parallel_region(t, group=group).index_select(0, order)
                  for t in (key, value))
    return key, value
