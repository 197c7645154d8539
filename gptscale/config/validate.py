"""Checks that a configuration can run on a given world size, before any process does work.

Every rule names the fields involved, so the message tells the user what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gptscale.config.schema import (Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, PositionEmbedding,
                                    Precision)
from gptscale.optim import OPTIMIZERS, REFUSED


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""


@dataclass(frozen=True)
class Layout:
    """Rank counts and batch arithmetic derived from a config and a world size."""

    world_size: int
    tp: int
    pp: int
    vpp: int  # model chunks per pipeline rank (1 without interleaving)
    dp: int
    micro_batch: int
    global_batch: int
    ep: int = 1  # expert parallel: carved out of the data-parallel ranks

    @property
    def num_microbatches(self) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step (gradient accumulation)."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def expert_dp(self) -> int:
        """Copies of each expert: the data-parallel ranks that hold the same experts."""
        return self.dp // self.ep


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def check(cfg: Config, world_size: int) -> Layout:
    """Return the layout of ``cfg`` on ``world_size`` ranks or raise ConfigError naming the fields at fault."""
    model, par, train = cfg.model, cfg.parallel, cfg.train
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for name in ("tp", "pp", "micro_batch", "global_batch"):
        need(getattr(par, name) >= 1, f"parallel.{name}={getattr(par, name)} must be at least 1")
    need(par.vpp is None or par.vpp >= 1, f"parallel.vpp={par.vpp} must be at least 1 (or null)")
    need(par.zero in (0, 1, 2, 3), f"parallel.zero={par.zero} must be a ZeRO stage 0, 1, 2 or 3")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    tp, pp, vpp = par.tp, par.pp, par.vpp or 1
    model_parallel = tp * pp
    need(
        world_size % model_parallel == 0,
        f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {tp} * {pp} = {model_parallel}",
    )
    dp = max(world_size // model_parallel, 1)

    groups = model.query_groups
    need(
        model.hidden_size % model.num_attention_heads == 0,
        f"model.hidden_size={model.hidden_size} is not divisible by model.num_attention_heads={model.num_attention_heads}",
    )
    need(
        model.num_attention_heads % tp == 0,
        f"model.num_attention_heads={model.num_attention_heads} is not divisible by parallel.tp={tp}",
    )
    need(
        model.num_attention_heads % groups == 0,
        f"model.num_attention_heads={model.num_attention_heads} is not divisible by model.num_query_groups={groups}",
    )
    need(groups % tp == 0, f"model.num_query_groups={groups} is not divisible by parallel.tp={tp}")
    ffn = model.ffn_size
    need(ffn % tp == 0, f"model.ffn_hidden_size={ffn} is not divisible by parallel.tp={tp}")
    need(
        model.vocab_multiple % tp == 0,
        f"model.vocab_multiple={model.vocab_multiple} is not divisible by parallel.tp={tp} "
        "(embedding rows are split over tensor-parallel ranks)",
    )
    need(
        model.num_layers % (pp * vpp) == 0,
        f"model.num_layers={model.num_layers} is not divisible by parallel.pp * parallel.vpp = {pp} * {vpp}",
    )
    need(par.vpp is None or pp > 1, f"parallel.vpp={par.vpp} needs parallel.pp > 1")
    need(not par.sp or tp > 1, "parallel.sp=true (sequence parallel) needs parallel.tp > 1")
    need(
        not par.sp or train.seq_len % tp == 0,
        f"train.seq_len={train.seq_len} is not divisible by parallel.tp={tp} (needed by parallel.sp=true)",
    )
    need(
        par.zero <= 1 or pp == 1,
        f"parallel.zero={par.zero} with parallel.pp={pp}: ZeRO stages 2 and 3 partition gradients during "
        "backward and cannot run under pipeline parallelism; use parallel.zero=0 or 1",
    )
    need(
        par.global_batch % (par.micro_batch * dp) == 0,
        f"parallel.global_batch={par.global_batch} is not divisible by parallel.micro_batch * data-parallel size "
        f"= {par.micro_batch} * {dp} (world size {world_size} / (tp {tp} * pp {pp}))",
    )
    if par.vpp is not None and pp > 1 and par.global_batch % (par.micro_batch * dp) == 0:
        micro = par.global_batch // (par.micro_batch * dp)
        need(
            micro % pp == 0,
            f"interleaved pipelining (parallel.vpp={par.vpp}) needs the number of micro-batches per step "
            f"({micro} = parallel.global_batch / (parallel.micro_batch * dp)) to be a multiple of parallel.pp={pp}",
        )
    _check_data(cfg.data, need)
    _check_moe(model, par, dp, cfg.train.fp8 is not None, need)
    need(train.seq_len >= 1, f"train.seq_len={train.seq_len} must be at least 1")
    need(
        model.position_embedding != PositionEmbedding.learned or train.seq_len <= model.max_position_embeddings,
        f"train.seq_len={train.seq_len} exceeds model.max_position_embeddings={model.max_position_embeddings} "
        "(learned position embeddings)",
    )
    need(train.steps >= 0, f"train.steps={train.steps} must not be negative")
    need(
        train.fp8 is None or train.precision == Precision.bf16,
        f"train.fp8={getattr(train.fp8, 'value', train.fp8)} needs train.precision=bf16 "
        f"(not {train.precision.value}): FP8 matmuls take bf16 weights and activations",
    )
    need(not train.fp8_emulate or train.fp8 is not None, "train.fp8_emulate=true needs train.fp8 (hybrid or e4m3)")
    need(train.spike.window >= 2, f"train.spike.window={train.spike.window} must be at least 2 (a std needs two steps)")
    need(train.spike.zscore is None or train.spike.zscore >= 0,
         f"train.spike.zscore={train.spike.zscore} must not be negative (null or 0 disables spike detection)")
    need(train.spike.min_relative_std > 0,
         f"train.spike.min_relative_std={train.spike.min_relative_std} must be positive (a floor of the std)")
    need(train.spike.max_consecutive >= 0,
         f"train.spike.max_consecutive={train.spike.max_consecutive} must not be negative (0: no bound)")
    need(train.spike.max_rewinds >= 0, f"train.spike.max_rewinds={train.spike.max_rewinds} must not be negative")
    need(cfg.checkpoint.rewind is None or cfg.checkpoint.rewind >= 0,
         f"checkpoint.rewind={cfg.checkpoint.rewind} must not be negative (a step)")
    need(cfg.bench.steps >= 1, f"bench.steps={cfg.bench.steps} must be at least 1")
    for name in ("warmup", "profile_steps"):
        need(getattr(cfg.bench, name) >= 0, f"bench.{name}={getattr(cfg.bench, name)} must not be negative")
    need(cfg.optim.warmup_steps >= 0, f"optim.warmup_steps={cfg.optim.warmup_steps} must not be negative")
    need(len(cfg.optim.betas) == 2, f"optim.betas={list(cfg.optim.betas)} must hold two numbers")
    _check_optimizer(cfg.optim, par.zero, need)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return Layout(world_size, tp, pp, vpp, dp, par.micro_batch, par.global_batch, par.ep)


def _check_optimizer(optim: OptimConfig, zero: int, need: Callable[[bool, str], None]) -> None:
    """The optimizer exists and the installed DeepSpeed runs it correctly at this ZeRO stage."""
    kind = OPTIMIZERS.get(optim.name)
    if kind is None:
        reason = REFUSED.get(optim.name, f"unknown; choose one of {', '.join(OPTIMIZERS)}")
        need(False, f"optim.name={optim.name} is not offered: {reason}")
        return
    need(zero in kind.zero_stages, f"optim.name={optim.name} is not correct under parallel.zero={zero} "
         f"(stages it runs correctly at: {', '.join(map(str, kind.zero_stages))})")


def _check_data(data: DataConfig, need: Callable[[bool, str], None]) -> None:
    need(data.on_error in ("raise", "skip"), f"data.on_error={data.on_error!r} must be 'raise' or 'skip'")
    need(not (data.path and data.sources), "data.path and data.sources are exclusive: give one dataset or a list")
    for i, source in enumerate(data.sources):
        need(source.weight > 0, f"data.sources[{i}].weight={source.weight} must be positive")
    need(data.workers >= 0, f"data.workers={data.workers} must not be negative")
    need(data.embedded_max_bytes > 0, f"data.embedded_max_bytes={data.embedded_max_bytes} must be positive")
    need(data.embedded_vocab_size >= 258,
         f"data.embedded_vocab_size={data.embedded_vocab_size} must be at least 258 (256 bytes + end of document)")


def _check_moe(model: ModelConfig, par: ParallelConfig, dp: int, fp8: bool, need: Callable[[bool, str], None]) -> None:
    """Mixture-of-experts rules: what megatron-core's MoE layers and DeepSpeed's engine can run."""
    moe, ep, tp = model.moe, par.ep, par.tp
    need(ep >= 1, f"parallel.ep={ep} must be at least 1")
    need(moe.num_experts >= 0, f"model.moe.num_experts={moe.num_experts} must not be negative (0: dense model)")
    if moe.num_experts <= 0:
        need(ep == 1, f"parallel.ep={ep} needs a mixture-of-experts model (model.moe.num_experts is 0)")
        return
    experts = moe.num_experts
    need(ep < 1 or experts % ep == 0,
         f"model.moe.num_experts={experts} is not divisible by parallel.ep={ep} (each rank holds experts / ep)")
    need(ep < 1 or dp % ep == 0,
         f"parallel.ep={ep} does not divide the data-parallel size {dp} (world size / (parallel.tp * parallel.pp)): "
         "expert-parallel ranks are carved out of the data-parallel ranks")
    need(1 <= moe.top_k <= experts,
         f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={experts}")
    need(tp == 1 or par.sp,
         f"parallel.tp={tp} with a mixture-of-experts model needs parallel.sp=true "
         "(megatron-core's MoE layers require sequence parallelism under tensor parallelism)")
    expert_ffn = model.expert_ffn_size
    need(expert_ffn >= 1 and expert_ffn % tp == 0,
         f"model.moe.ffn_hidden_size={expert_ffn} must be positive and divisible by parallel.tp={tp}")
    need(moe.shared_expert_size >= 0 and moe.shared_expert_size % tp == 0,
         f"model.moe.shared_expert_size={moe.shared_expert_size} must not be negative and be divisible by "
         f"parallel.tp={tp}")
    need(not moe.shared_expert_gate or moe.shared_expert_size > 0,
         "model.moe.shared_expert_gate=true needs a shared expert (model.moe.shared_expert_size > 0)")
    need(moe.layer_freq >= 1, f"model.moe.layer_freq={moe.layer_freq} must be at least 1")
    for name in ("aux_loss_coeff", "z_loss_coeff", "expert_bias_update_rate"):
        need(getattr(moe, name) >= 0, f"model.moe.{name}={getattr(moe, name)} must not be negative")
    need(moe.capacity_factor is None or moe.capacity_factor > 0,
         f"model.moe.capacity_factor={moe.capacity_factor} must be positive (or null: dropless routing)")
    need(not (moe.pre_softmax and moe.expert_bias),
         "model.moe.pre_softmax=true and model.moe.expert_bias=true are exclusive: expert biases use sigmoid "
         "scores, not a softmax")
    need(not model.bias or tp == 1,
         f"model.bias=true with a mixture-of-experts model and parallel.tp={tp}: megatron-core's experts take "
         "biases only without tensor parallelism")
    need(par.zero < 3 or ep == 1,
         f"parallel.zero=3 with parallel.ep={ep}: ZeRO-3 partitions the experts over the full data-parallel group "
         "and counts the dense copies twice in the gradient norm; use parallel.zero=0, 1 or 2")
    need(not fp8, "train.fp8 with a mixture-of-experts model (model.moe.num_experts > 0) is not supported")
