"""Process groups: torch.distributed plus megatron-core's tensor/pipeline/data-parallel groups.

Rank order is megatron-core's default (tensor-parallel ranks adjacent, then context-parallel, expert-parallel,
data-parallel, then pipeline), so a tensor-parallel group stays inside a node.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from gptscale.config.layout import Layout
from gptscale.parallel import cpu


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the layout."""

    layout: Layout
    rank: int
    local_rank: int
    device: torch.device
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int = 0
    cp_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def choose_device(requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"train.device={requested} but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the job's process group (NCCL on GPU, gloo on CPU); a lone process without torchrun forms its own.
    ``timeout_s``: how long a collective may wait (``fault.collective_timeout_s``)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "MASTER_ADDR" not in os.environ:  # not started by torchrun or a cluster launcher: a lone process
        # An in-memory store: no port to pick, so concurrent lone runs cannot race for one. No environment
        # variable is set either, so processes it starts do not take themselves for ranks of a job.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=timeout_s)
        )
        return
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def init_parallel(layout: Layout, device: torch.device, seed: int, timeout_s: float = 1800.0) -> ParallelContext:
    """Set up torch.distributed and megatron-core's groups for ``layout``; seed the model-parallel RNG."""
    if device.type == "cpu":
        cpu.install()
    init_distributed(device, timeout_s)
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"layout was checked for {layout.world_size} ranks but the job has {dist.get_world_size()}")
    init_model_parallel(layout, seed, timeout_s)
    return ParallelContext(
        layout=layout,
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        device=device,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
    )


def init_model_parallel(layout: Layout, seed: int, timeout_s: float = 1800.0) -> None:
    """megatron-core's TP / CP / PP / DP / EP groups over the initialised world, and its model-parallel RNG."""
    destroy_model_parallel()  # a previous run in this process may have left its layout
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        context_parallel_size=layout.cp,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
