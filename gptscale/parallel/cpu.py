"""Lets megatron-core and DeepSpeed run on CPU with gloo.

megatron-core assumes CUDA in many places (factory calls with ``device="cuda"``, ``torch.cuda`` RNG and
device queries). On a machine without a GPU we point those calls at the CPU: a TorchFunctionMode rewrites
CUDA device arguments, and the few ``torch.cuda`` functions megatron-core calls are mapped to their CPU
counterparts. Nothing here is active when CUDA is available.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.overrides import TorchFunctionMode

_installed: "_CudaToCpu | None" = None


def _as_cpu(device):
    if isinstance(device, int) or (device is not None and str(device).startswith("cuda")):
        return torch.device("cpu")
    return device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` (or a CUDA index) to the CPU in every torch call, ``Tensor.cuda`` to a no-op, and
    drops ``pin_memory`` (page-locked host memory is for copies to a GPU; megatron-core's context-parallel
    rotary embedding asks for it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_as_cpu(kwargs["device"]))
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, int, torch.device)):
            args = (args[0], _as_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


class _HostStream:
    """A CUDA stream stand-in: on the CPU every operation is already ordered, so waits and events do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None) -> "_HostStream":
        return self

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> "_HostStream":
        return self

    def __exit__(self, *exc) -> None:
        pass


_HOST_STREAM = _HostStream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.Stream = _HostStream  # megatron-core's MoE token dispatcher copies split sizes on a side stream
    cuda.current_stream = lambda device=None: _HOST_STREAM
    cuda.stream = lambda stream: _HOST_STREAM
    cuda.current_device = lambda: torch.device("cpu")  # also right inside autograd backward, where modes are off
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it after seeding the CPU generator
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_allocated = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.empty_cache = lambda: None


def _patch_megatron_rng() -> None:
    """The "CUDA" RNG of megatron-core's tracker becomes the CPU generator.

    The tracker warns whenever the CPU generator changes inside a forked CUDA-RNG region, which on CPU is
    every time: that warning is dropped.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def _patch_megatron_moe_splits() -> None:
    """The MoE token dispatcher moves its all-to-all split sizes to the host as numpy arrays, but only from a
    CUDA tensor; a CPU tensor stayed a tensor, which torch.distributed's all_to_all_single does not take."""
    from megatron.core.transformer.moe import token_dispatcher

    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def _patch_megatron_uneven_collectives() -> None:
    """Under tensor parallelism the MoE dispatcher gathers and reduce-scatters token blocks of uneven sizes,
    which gloo does not do: the gather pads every block to the largest and the reduce-scatter all-reduces the
    whole input and keeps this rank's block."""
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        blocks = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(blocks, padded.contiguous(), group=group)
        return torch.cat([block[:size] for block, size in zip(blocks, output_split_sizes)])

    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        return torch.split(total, input_split_sizes, dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven


def _skip_deepspeed_native_ops() -> None:
    """Keep DeepSpeed from compiling its shared-memory collective (~40 s of C++ on first use); gloo does the work."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    compatible = deepspeed.ops.__dict__.get("__compatible_ops__")
    if compatible is None:
        compatible = deepspeed.ops.__dict__["__compatible_ops__"] = {}
    compatible["deepspeed_shm_comm"] = False


def install() -> None:
    """Install the CPU backend once per process (idempotent). Call before building megatron-core modules."""
    global _installed
    if _installed is not None:
        return
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_moe_splits()
    _patch_megatron_uneven_collectives()
    _skip_deepspeed_native_ops()
    _installed = _CudaToCpu()
    _installed.__enter__()
