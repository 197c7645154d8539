"""Each rank's parameters, read from the configured model built on the meta device.

Nothing here restates the model's shapes: megatron-core builds the rank's chunks (tensor-parallel shards,
the pipeline stage's layers, the embedding on the first stage, the output layer or the tied embedding's
copy on the last, the rank's experts) inside a fake process group of the layout's size, and
``gptscale.parallel.deepspeed.parameter_groups`` splits them as the optimizer does. When the model
changes, the plan follows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from gptscale.config.schema import Backend, Config, Recompute
from gptscale.config.validate import Layout
from gptscale.model.build import build_model
from gptscale.parallel import cpu
from gptscale.parallel.deepspeed import parameter_groups
from gptscale.plan.meta import on_meta


@dataclass(frozen=True)
class RankParameters:
    """One rank's trainable parameters: element counts in module order and in the optimizer's groups."""

    numels: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    dtype_bytes: int

    @property
    def total(self) -> int:
        return sum(self.numels)


def from_module(model: torch.nn.Module) -> RankParameters:
    """The parameters of a built model (meta or real), as the engine's optimizer groups them."""
    numels = tuple(p.numel() for p in model.parameters() if p.requires_grad)
    groups = tuple(tuple(p.numel() for p in group["params"]) for group in parameter_groups(model, 0.1))
    dtype_bytes = next(model.parameters()).element_size()
    return RankParameters(numels, groups, dtype_bytes)


@contextlib.contextmanager
def fake_groups(world_size: int, rank: int, layout: Layout):
    """torch.distributed and megatron-core's groups for one rank of ``layout``, without other processes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("gptscale.plan builds models in a fake process group and must run outside a "
                           "distributed job (torch.distributed is already initialised)")
    if not torch.cuda.is_available():
        cpu.install()  # megatron-core asks for CUDA streams and RNG states while it builds and runs layers
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            expert_model_parallel_size=layout.ep,
            create_gloo_process_groups=False,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(0)  # recomputation and dropout fork its RNG states
        yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def rank_parameters(cfg: Config, layout: Layout, vocab_size: int, pp_rank: int, ep_rank: int = 0) -> RankParameters:
    """Parameters of the rank at pipeline stage ``pp_rank`` and expert-parallel rank ``ep_rank``.

    Tensor-parallel ranks hold equal shards (``config.check`` asks for even splits) and data-parallel ranks
    the same weights, so the model is built once per (stage, expert rank), at tensor-parallel rank 0, in a
    world of tp x ep x pp ranks (megatron-core's rank order: tensor, then data/expert, then pipeline).
    Builds are cached by what decides shapes: ZeRO stage, batch sizes and recomputation do not.
    """
    parallel = replace(cfg.parallel, zero=0, micro_batch=1, global_batch=1)
    train = replace(cfg.train, activation_checkpointing=Recompute.none, steps=0)
    key = (repr(cfg.model), repr(parallel), repr(train), vocab_size, pp_rank, ep_rank)
    if key not in _built:
        _built[key] = _build(cfg, parallel, train, layout, vocab_size, pp_rank, ep_rank)
    return _built[key]


_built: dict[tuple, RankParameters] = {}


def _build(cfg: Config, parallel, train, layout: Layout, vocab_size: int, pp_rank: int, ep_rank: int) -> RankParameters:
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    world = tp * ep * pp
    shape_layout = Layout(world, tp, pp, layout.vpp, ep, 1, ep, ep)
    rank = tp * (ep_rank + ep * pp_rank)
    with fake_groups(world, rank, shape_layout):
        position = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_expert_model_parallel_rank())
        assert position == (pp_rank, ep_rank), f"rank {rank} of {world} sits at {position}, not {(pp_rank, ep_rank)}"
        with on_meta():
            chunks = build_model(cfg.model, parallel, train, vocab_size, Backend.local, torch.device("meta"))
        return from_module(chunks)
