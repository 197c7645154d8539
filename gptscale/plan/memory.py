"""One rank's predicted memory: model states (exact, DeepSpeed's layout) and activations."""

from __future__ import annotations

from dataclasses import dataclass

from gptscale.config.layout import Layout
from gptscale.config.schema import Config, Precision
from gptscale.optim import OPTIMIZERS
from gptscale.parallel.engine import engine_config
from gptscale.plan.activations import stage_activation_bytes
from gptscale.plan.counts import RankParameters, rank_parameters
from gptscale.plan.states import StateBytes, state_bytes, zero_settings


def states_of(params: RankParameters, cfg: Config, layout: Layout, dp_rank: int = 0) -> StateBytes:
    """Model-state bytes of ``params`` at data-parallel rank ``dp_rank`` (DeepSpeed partitions over the
    expert-data-parallel group, which is the data-parallel group without expert parallelism)."""
    engine = engine_config(layout, cfg.optim, cfg.train)
    moment_bytes = OPTIMIZERS[cfg.optim.name].state_bytes_per_parameter
    key = (
        params,
        layout.expert_dp,
        cfg.parallel.zero,
        cfg.train.precision,
        dp_rank,
        repr(engine["zero_optimization"]),
        moment_bytes,
    )
    if key not in _states:
        _states[key] = state_bytes(
            [list(group) for group in params.groups],
            layout.expert_dp,
            cfg.parallel.zero,
            cfg.train.precision == Precision.bf16,
            dp_rank,
            zero_settings(engine),
            list(params.numels),
            moment_bytes=moment_bytes,
        )
    return _states[key]


_states: dict[tuple, StateBytes] = {}


def rank_states(
    cfg: Config, layout: Layout, vocab_size: int, pp_rank: int, ep_rank: int = 0, dp_rank: int = 0
) -> StateBytes:
    """Model-state bytes of the rank at (pipeline stage, expert rank, data-parallel rank) of ``layout``."""
    return states_of(rank_parameters(cfg, layout, vocab_size, pp_rank, ep_rank), cfg, layout, dp_rank)


ALLOCATOR_MARGIN = 0.10  # share added for the caching allocator's fragmentation and transient buffers


@dataclass(frozen=True)
class RankMemory:
    """Predicted bytes of one rank: model states, one micro-batch's activations, the schedule's in-flight
    activations and the allocator margin on top."""

    pp_rank: int
    dp_rank: int
    states: StateBytes
    activations_one: int
    activations_peak: int

    @property
    def margin(self) -> int:
        return round(ALLOCATOR_MARGIN * (self.states.total + self.activations_peak))

    @property
    def total(self) -> int:
        return self.states.total + self.activations_peak + self.margin


def rank_memory(cfg: Config, layout: Layout, vocab_size: int, pp_rank: int, dp_rank: int = 0) -> RankMemory:
    one, peak = stage_activation_bytes(cfg, layout, vocab_size, pp_rank)
    return RankMemory(pp_rank, dp_rank, rank_states(cfg, layout, vocab_size, pp_rank, 0, dp_rank), one, peak)


def layout_memory(cfg: Config, layout: Layout, vocab_size: int) -> list[RankMemory]:
    """The ranks that can hold the most: first and last pipeline stage (embedding, most micro-batches in
    flight; output layer and logits) at the first and last data-parallel rank (ZeRO's padding)."""
    stages = sorted({0, layout.pp - 1})
    dp_ranks = sorted({0, layout.expert_dp - 1})
    return [rank_memory(cfg, layout, vocab_size, stage, dp_rank) for stage in stages for dp_rank in dp_ranks]
