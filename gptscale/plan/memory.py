"""One rank's predicted memory: model states (exact, DeepSpeed's layout) and activations."""

from __future__ import annotations

from gptscale.config.schema import Config, Precision
from gptscale.config.validate import Layout
from gptscale.parallel.deepspeed import engine_config
from gptscale.plan.counts import RankParameters, rank_parameters
from gptscale.plan.states import StateBytes, state_bytes, zero_settings


def states_of(params: RankParameters, cfg: Config, layout: Layout, dp_rank: int = 0) -> StateBytes:
    """Model-state bytes of ``params`` at data-parallel rank ``dp_rank`` (DeepSpeed partitions over the
    expert-data-parallel group, which is the data-parallel group without expert parallelism)."""
    settings = zero_settings(engine_config(layout, cfg.parallel.zero, cfg.optim, cfg.train))
    return state_bytes([list(group) for group in params.groups], layout.expert_dp, cfg.parallel.zero,
                       cfg.train.precision == Precision.bf16, dp_rank, settings, list(params.numels))


def rank_states(cfg: Config, layout: Layout, vocab_size: int, pp_rank: int, ep_rank: int = 0,
                dp_rank: int = 0) -> StateBytes:
    """Model-state bytes of the rank at (pipeline stage, expert rank, data-parallel rank) of ``layout``."""
    return states_of(rank_parameters(cfg, layout, vocab_size, pp_rank, ep_rank), cfg, layout, dp_rank)
