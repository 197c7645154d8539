"""Finds host syncs in a training step: places where the host waits for the device.

A GPU step runs fast only while the host queues kernels ahead of the device; reading a tensor's value
(``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``) or synchronising the device stops that. The
detector counts those calls by call site. On GPU it counts reads of CUDA tensors only, plus explicit
synchronisation (DeepSpeed's timers, for instance). On CPU every tensor is a host tensor, so it finds
the call sites a GPU run would stall on and also reads of tensors that live on the host anyway (such as
megatron-core's check of the CPU RNG state).
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.nonzero,
}
_OWN_FILES = (__file__, "torch/overrides.py", "torch/utils/_device.py", "torch/_tensor.py")


def _call_site(depth: int = 3) -> str:
    """The innermost frames outside this module and torch's dispatch, innermost first."""
    frames = [f for f in traceback.extract_stack()[:-2] if not f.filename.endswith(_OWN_FILES)]
    return " <- ".join(
        f"{f.filename.split('site-packages/')[-1].split('/gptscale/')[-1]}:{f.lineno}"
        for f in reversed(frames[-depth:])
    )


class _TensorReads(TorchFunctionMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS and (args[0].is_cuda or not torch.cuda.is_available()):
            self.counts[f"{func.__name__} at {_call_site()}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counting(owner, name: str, counts: collections.Counter) -> Iterator[None]:
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        counts[f"{name} at {_call_site()}"] += 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def host_syncs() -> Iterator[collections.Counter]:
    """Count host syncs inside the block: ``{"item at file:line <- caller ...": count}``."""
    from deepspeed.accelerator import get_accelerator

    counts: collections.Counter = collections.Counter()
    with (
        _counting(torch.cuda, "synchronize", counts),
        _counting(get_accelerator(), "synchronize", counts),
        _TensorReads(counts),
    ):
        yield counts
