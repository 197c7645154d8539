"""Each rank's parameters, read from the configured model built on the meta device.

Nothing here restates the model's shapes: megatron-core builds the rank's chunks (tensor-parallel shards,
the pipeline stage's layers, the embedding on the first stage, the output layer or the tied embedding's
copy on the last, the rank's experts) inside a fake process group of the layout's size, and
``gptscale.parallel.engine.parameter_groups`` splits them as the optimizer does. When the model
changes, the plan follows.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from gptscale.config.layout import Layout
from gptscale.config.schema import Backend, Config, Recompute
from gptscale.model.build import build_model
from gptscale.parallel import cpu
from gptscale.parallel.engine import parameter_groups
from gptscale.parallel.groups import destroy_model_parallel, init_model_parallel
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
def fake_groups(layout: Layout, rank: int):
    """torch.distributed and megatron-core's groups for one rank of ``layout``, without other processes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError(
            "gptscale.plan builds models in a fake process group and must run outside a "
            "distributed job (torch.distributed is already initialised)"
        )
    if not torch.cuda.is_available():
        cpu.install()  # megatron-core asks for CUDA streams and RNG states while it builds and runs layers
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world_size)
    try:
        with warnings.catch_warnings():
            # Advice for a real run (CUDA_DEVICE_MAX_CONNECTIONS, renamed collectives) says nothing of a plan.
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
            warnings.filterwarnings("ignore", message="When using sequence parallelism")
            init_model_parallel(layout, seed=0)  # recomputation and dropout fork its RNG states
            yield
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


def rank_parameters(cfg: Config, layout: Layout, vocab_size: int, pp_rank: int, ep_rank: int = 0) -> RankParameters:
    """Parameters of the rank at pipeline stage ``pp_rank`` (any tensor-, data- or expert-parallel rank:
    ``config.check`` asks for even splits, so their shards have equal shapes).

    The model is built once per tensor/expert-parallel size (cached by what decides shapes: not the
    pipeline, ZeRO stage, batch sizes or recomputation) with one period of its layer pattern (one layer,
    or ``model.moe.layer_freq`` with MoE layers), and a stage takes the modules megatron-core gives it:
    layers split evenly, model chunk v of stage r holding the (v * pp + r)-th block of
    num_layers / (pp * vpp) layers, the embedding on the first chunk of the first stage, the final norm and
    the output layer on the last chunk of the last, where a tied embedding's output weight is a copy.
    Tests hold this to the model megatron-core builds for each stage and to what a real run holds.
    """
    model = _pattern_model(cfg, layout, vocab_size)
    key = (id(model), cfg.model.num_layers, layout.pp, layout.vpp, pp_rank)
    if key not in _stages:
        _stages[key] = _stage_parameters(model, cfg.model.num_layers, layout, pp_rank)
    return _stages[key]


_stages: dict[tuple, RankParameters] = {}


def _stage_parameters(model: torch.nn.Module, num_layers: int, layout: Layout, pp_rank: int) -> RankParameters:
    pattern = list(model.decoder.layers)
    pp, vpp = layout.pp, layout.vpp
    per_chunk = num_layers // (pp * vpp)
    modules: list[torch.nn.Module] = []
    for chunk in range(vpp):
        if pp_rank == 0 and chunk == 0:
            modules.append(model.embedding)
        start = (chunk * pp + pp_rank) * per_chunk
        modules.extend(pattern[index % len(pattern)] for index in range(start, start + per_chunk))
        if pp_rank == pp - 1 and chunk == vpp - 1:
            modules.append(model.decoder.final_layernorm)
            modules.append(model.output_layer)
            if model.share_embeddings_and_output_weights and pp > 1:
                modules.append(_Copy(model.embedding.word_embeddings.weight))  # the last stage's output weight
    numels, groups = [], None
    for module in modules:  # a layer may appear many times: its parameters count each time
        numels.extend(p.numel() for p in module.parameters() if p.requires_grad)
        module_groups = [[p.numel() for p in group["params"]] for group in parameter_groups(module, 0.1)]
        groups = module_groups if groups is None else [a + b for a, b in zip(groups, module_groups)]
    dtype_bytes = next(model.parameters()).element_size()
    return RankParameters(tuple(numels), tuple(tuple(group) for group in groups), dtype_bytes)


class _Copy(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty_like(weight))


_built: dict[tuple, torch.nn.Module] = {}


def _pattern_model(cfg: Config, layout: Layout, vocab_size: int) -> torch.nn.Module:
    """The model at tensor-parallel size tp and expert-parallel size ep, without pipelining, with one
    period of its layer pattern, on the meta device."""
    key = (shape_key(cfg), layout.tp, layout.ep, vocab_size)
    if key not in _built:
        period = cfg.model.moe.layer_freq if cfg.model.moe.num_experts else 1
        model = replace(cfg.model, num_layers=min(period, cfg.model.num_layers))
        parallel = replace(
            cfg.parallel,
            tp=layout.tp,
            cp=1,
            pp=1,
            vpp=None,
            ep=layout.ep,
            zero=0,
            micro_batch=1,
            global_batch=layout.ep,
        )
        train = replace(cfg.train, activation_checkpointing=Recompute.none, steps=0)
        world = layout.tp * layout.ep
        with fake_groups(Layout(world, layout.tp, 1, 1, layout.ep, 1, layout.ep, layout.ep), 0):
            with on_meta():
                _built[key] = build_model(
                    model, parallel, train, vocab_size, Backend.local, torch.device("meta")
                ).chunks[0]
    return _built[key]


_reprs: dict[int, tuple] = {}


def shape_key(cfg: Config) -> tuple:
    """What decides shapes besides the layout: the model, precision, sequence length and the layer spec's
    settings (not ZeRO, batch sizes or recomputation); memoised by object, as a search shares them."""
    model, train = cfg.model, cfg.train
    if id(model) not in _reprs or _reprs[id(model)][0] is not model:
        _reprs[id(model)] = (model, repr(model))
    return (_reprs[id(model)][1], train.precision, train.seq_len, train.fp8, train.fp8_recipe, train.fp8_emulate)
