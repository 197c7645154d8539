"""Running megatron-core on the meta device: shapes and dtypes, no storage, no compute.

Two things the meta device does not do as a GPU does are stood in for: tensors megatron-core makes for an
explicit device (RoPE frequencies on the current CUDA device) are made on the meta device too, and
``scaled_dot_product_attention`` saves for backward what the fused kernels save (queries, keys, values,
the output and the log-sum-exp per query), where the meta device would fall back to the math path and
materialise the T x T scores. Mixture-of-experts layers, which route by value, route as a perfectly
balanced router would: the data-dependent reads of megatron-core's dispatcher (how many pairs
``masked_select`` picks, the split sizes and token counts it reads on the host) are answered from the
router's ``topk``, and the permutation keeps what it saves for backward.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from torch.overrides import TorchFunctionMode


class _OnMeta(TorchFunctionMode):
    """Tensors made for an explicit device (megatron-core puts RoPE frequencies on the current CUDA device)
    go to the meta device as well; constants made from Python values stay real, so flags can be read."""

    def __init__(self, top_k: int | None = None):
        super().__init__()
        self.top_k = top_k
        self.routed = None  # (token-expert pairs, experts) of the last routing

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            return _FusedAttention.apply(*args[:3])
        if self.top_k and func is torch.topk and args[0].device.type == "meta":
            return self._choose(func, *args, **kwargs)
        if self.top_k and func in (torch.masked_select, torch.Tensor.masked_select) and args[0].device.type == "meta":
            return self._route(*args)
        if self.top_k and func is torch.Tensor.tolist and args[0].device.type == "meta":
            return self._tokens_per_expert(args[0])
        if self.top_k and func is torch.Tensor.numpy and args[0].device.type == "meta":
            return self._split_sizes(args[0])
        if func is torch.tensor:  # a constant from Python data: flags whose value is read (``.item()``)
            return func(*args, **dict(kwargs, device=torch.device("cpu")))
        if self.top_k and func is torch.arange and str(kwargs.get("device")) == "cpu":
            return func(*args, **kwargs)  # the dispatcher's expert order, read on the host
        if kwargs.get("device") is not None:
            kwargs = dict(kwargs, device=torch.device("meta"))
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, int, torch.device)):
            args = (args[0], torch.device("meta"), *args[2:])
        return func(*args, **kwargs)

    def _choose(self, topk, scores: torch.Tensor, *args, **kwargs):
        """The router picks each token's experts (``[tokens, experts]`` scores): remember how many pairs."""
        chosen = topk(scores, *args, **kwargs)
        if kwargs.get("k", args[0] if args else None) == self.top_k:
            self.routed = (scores.shape[0] * self.top_k, scores.shape[-1])
        return chosen

    def _route(self, values: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        """megatron-core's permutation selects, from ``[experts, tokens]``, the ``top_k`` pairs of each token."""
        return _MaskedSelect.apply(values, routing_map, routing_map.shape[1] * self.top_k)

    def _tokens_per_expert(self, counts: torch.Tensor) -> list[int]:
        """Perfectly balanced routing: the rank's experts get an equal share of the pairs routed to them in
        the expert-tensor-parallel group (the dispatcher gathers its sequence-parallel tokens), spread evenly
        over the counts read (per local expert, or per source rank and local expert)."""
        pairs, _ = self._last_routing(counts)
        gathered = pairs * parallel_state.get_expert_tensor_parallel_world_size()
        received = gathered // parallel_state.get_expert_model_parallel_world_size()
        share, extra = divmod(received, counts.numel())
        return [share + (index < extra) for index in range(counts.numel())]

    def _split_sizes(self, splits: torch.Tensor) -> np.ndarray:
        """The dispatcher's all-to-all and all-gather split sizes, read on the host: at one expert-parallel
        rank (where the plan measures) each is what one rank routes, its token-expert pairs."""
        pairs, _ = self._last_routing(splits)
        if parallel_state.get_expert_model_parallel_world_size() != 1:
            raise RuntimeError(
                "gptscale.plan: balanced routing on the meta device is measured at one expert-parallel rank"
            )
        return np.full(tuple(splits.shape), pairs, dtype=np.int64)

    def _last_routing(self, read: torch.Tensor) -> tuple[int, int]:
        if self.routed is None or read.dim() != 1:
            raise RuntimeError(f"gptscale.plan: a meta tensor of shape {tuple(read.shape)} was read outside routing")
        return self.routed


@contextlib.contextmanager
def on_meta(top_k: int | None = None):
    """Every tensor created inside is a meta tensor: shapes and dtypes, no storage, no compute. ``top_k``: route
    mixture-of-experts tokens as a perfectly balanced router would (the meta device cannot route by value)."""
    with torch.device("meta"), _OnMeta(top_k):
        yield


class _FusedAttention(torch.autograd.Function):
    """The output shape and the saved tensors of a flash / memory-efficient attention kernel."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        logsumexp = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


class _MaskedSelect(torch.autograd.Function):
    """``masked_select`` with the number selected given: its output shape and what it saves for backward (the
    values and the mask), so that the routing probabilities keep their gradient path."""

    @staticmethod
    def forward(ctx, values, mask, selected: int):
        ctx.save_for_backward(values, mask)
        return values.new_empty(selected)

    @staticmethod
    def backward(ctx, grad):
        values, _ = ctx.saved_tensors
        return torch.empty_like(values), None, None
