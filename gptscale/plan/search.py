"""Plan one layout, or every layout of a cluster ranked by predicted tokens/s among those that fit.

Each candidate goes through ``config.check``, the same check training runs, so a refused layout shows the
message training would stop with. A layout that passes is refused when its fullest rank does not fit the
GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from gptscale.config.layout import Layout
from gptscale.config.schema import Config, Recompute
from gptscale.config.validate import ConfigError, check
from gptscale.plan.cluster import Cluster
from gptscale.plan.counts import rank_parameters
from gptscale.plan.memory import RankMemory, layout_memory
from gptscale.plan.step_time import StepTime, estimate

MICRO_BATCHES = (1, 2, 4, 8)
VIRTUAL_STAGES = (None, 2, 4)
CONTEXT_RANKS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Planned:
    """One candidate layout: its settings, and either why it is refused or its memory and speed."""

    settings: dict
    refused: Optional[str] = None
    layout: Optional[Layout] = None
    ranks: tuple[RankMemory, ...] = ()
    step: Optional[StepTime] = None
    tokens_per_s: float = 0.0

    @property
    def fullest(self) -> Optional[RankMemory]:
        return max(self.ranks, key=lambda rank: rank.total) if self.ranks else None


def with_settings(cfg: Config, settings: dict) -> Config:
    """``cfg`` with parallel.* and train.activation_checkpointing replaced by ``settings``."""
    train = {k: v for k, v in settings.items() if k == "activation_checkpointing"}
    parallel = {k: v for k, v in settings.items() if k != "activation_checkpointing"}
    return replace(cfg, parallel=replace(cfg.parallel, **parallel), train=replace(cfg.train, **train))


def settings_of(cfg: Config) -> dict:
    par = cfg.parallel
    return {
        "tp": par.tp,
        "cp": par.cp,
        "pp": par.pp,
        "vpp": par.vpp,
        "sp": par.sp,
        "ep": par.ep,
        "zero": par.zero,
        "micro_batch": par.micro_batch,
        "activation_checkpointing": cfg.train.activation_checkpointing,
    }


def plan(cfg: Config, cluster: Cluster, vocab_size: int) -> Planned:
    """Memory per rank and step time of ``cfg``'s own layout on ``cluster`` (or why it cannot run)."""
    settings = settings_of(cfg)
    try:
        layout = check(cfg, cluster.world_size)
    except ConfigError as error:
        return Planned(settings, refused=str(error))
    ranks = tuple(layout_memory(cfg, layout, vocab_size))
    numel = max(rank_parameters(cfg, layout, vocab_size, stage).total for stage in {0, layout.pp - 1})
    step = estimate(cfg, layout, cluster, vocab_size, numel)
    fullest = max(rank.total for rank in ranks)
    refused = None
    if fullest > cluster.gpu.memory_bytes:
        refused = (
            f"does not fit: {fullest / 2**30:.1f} GiB predicted on its fullest rank, "
            f"{cluster.gpu.memory_bytes / 2**30:.0f} GiB on a {cluster.gpu.name}"
        )
    tokens = layout.global_batch * cfg.train.seq_len / step.total_s
    return Planned(settings, refused, layout, ranks, step, tokens)


def candidates(cfg: Config, cluster: Cluster):
    """Every layout of the cluster: tp within a node, cp, pp, vpp, ep (MoE), ZeRO stage, micro-batch and
    recomputation. Sequence parallelism is on whenever tp > 1 (the same traffic as TP alone, less memory);
    selective recomputation is left out: it recomputes core attention, whose fused kernels save little,
    so it costs flops for next to no memory (docs/planning.md)."""
    world = cluster.world_size
    experts = cfg.model.moe.num_experts
    for tp in [d for d in range(1, cluster.gpus_per_node + 1) if cluster.gpus_per_node % d == 0]:
        for cp in [c for c in CONTEXT_RANKS if (world // tp) % c == 0]:
            for pp in [d for d in range(1, world // (tp * cp) + 1) if (world // (tp * cp)) % d == 0]:
                for vpp in VIRTUAL_STAGES if pp > 1 else (None,):
                    for ep in [e for e in (1, 2, 4, 8, 16, 32, 64) if e == 1 or (experts and experts % e == 0)]:
                        for zero in (0, 1, 2, 3):
                            for micro_batch in MICRO_BATCHES:
                                for recompute in (Recompute.none, Recompute.full):
                                    yield {
                                        "tp": tp,
                                        "cp": cp,
                                        "pp": pp,
                                        "vpp": vpp,
                                        "sp": tp > 1,
                                        "ep": ep,
                                        "zero": zero,
                                        "micro_batch": micro_batch,
                                        "activation_checkpointing": recompute,
                                    }


def search(cfg: Config, cluster: Cluster, vocab_size: int) -> list[Planned]:
    """Every candidate, those that fit first by predicted tokens/s, then the refused ones."""
    results = [plan(with_settings(cfg, settings), cluster, vocab_size) for settings in candidates(cfg, cluster)]
    fitting = sorted((r for r in results if r.refused is None), key=lambda r: -r.tokens_per_s)
    return fitting + [r for r in results if r.refused is not None]
