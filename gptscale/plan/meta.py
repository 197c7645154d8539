"""Running megatron-core on the meta device: shapes and dtypes, no storage, no compute.

Two things the meta device does not do as a GPU does are stood in for: tensors megatron-core makes for an
explicit device (RoPE frequencies on the current CUDA device) are made on the meta device too, and
``scaled_dot_product_attention`` saves for backward what the fused kernels save (queries, keys, values,
the output and the log-sum-exp per query), where the meta device would fall back to the math path and
materialise the T x T scores.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
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
        if self.top_k and func in (torch.masked_select, torch.Tensor.masked_select) and args[0].device.type == "meta":
            return self._route(*args)
        if self.top_k and func is torch.Tensor.tolist and args[0].device.type == "meta":
            return self._tokens_per_expert(args[0])
        if func is torch.tensor:  # a constant from Python data: flags whose value is read (``.item()``)
            return func(*args, **dict(kwargs, device=torch.device("cpu")))
        if self.top_k and func is torch.arange and str(kwargs.get("device")) == "cpu":
            return func(*args, **kwargs)  # the dispatcher's expert order, read on the host
        if kwargs.get("device") is not None:
            kwargs = dict(kwargs, device=torch.device("meta"))
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, int, torch.device)):
            args = (args[0], torch.device("meta"), *args[2:])
        return func(*args, **kwargs)


    def _route(self, values: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        """megatron-core's permutation selects, from ``[experts, tokens]``, the ``top_k`` pairs of each token."""
        experts, tokens = routing_map.shape
        self.routed = (tokens * self.top_k, experts)
        return torch.empty(tokens * self.top_k, dtype=values.dtype, device="meta")

    def _tokens_per_expert(self, counts: torch.Tensor) -> list[int]:
        """Perfectly balanced routing: every expert gets an equal share of the last routing's pairs."""
        if self.routed is None or counts.dim() != 1:
            raise RuntimeError(f"gptscale.plan: a meta tensor of shape {tuple(counts.shape)} was read outside routing")
        pairs, experts = self.routed
        share, extra = divmod(pairs * counts.numel() // experts, counts.numel())
        return [share + (index < extra) for index in range(counts.numel())]


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
