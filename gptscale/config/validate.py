"""Checks that a configuration can run on a given world size, before any process does work.

Every rule names the fields involved, so the message tells the user what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from gptscale.config.layout import Layout
from gptscale.config.schema import (
    Attention,
    Config,
    DataConfig,
    FaultConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PositionEmbedding,
    Precision,
    RopeScaling,
)
from gptscale.errors import GptscaleError
from gptscale.optim import OPTIMIZERS, REFUSED


class ConfigError(GptscaleError, ValueError):
    """A configuration that cannot run; the message lists every problem found."""

    exit_code = 2


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class Rule:
    """What a number must be, in the words the error message uses."""

    holds: Callable[[Any], bool]
    words: str


POSITIVE = Rule(lambda v: v > 0, "must be positive")
NON_NEGATIVE = Rule(lambda v: v >= 0, "must not be negative")
PROBABILITY = Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
FRACTION = Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")

# Every bounded number of the schema, checked before anything divides by it or runs with it. Null passes
# (the schema lets only Optional fields be null); a list is checked item by item. Rules involving several
# fields are in check().
RANGES: dict[str, Rule] = {
    "model.num_layers": POSITIVE,
    "model.hidden_size": POSITIVE,
    "model.num_attention_heads": POSITIVE,
    "model.num_query_groups": POSITIVE,
    "model.ffn_hidden_size": POSITIVE,
    "model.vocab_size": POSITIVE,
    "model.vocab_multiple": POSITIVE,
    "model.max_position_embeddings": POSITIVE,
    "model.rotary_base": POSITIVE,
    "model.rope_scaling.factor": Rule(lambda v: v >= 1, "must be at least 1 (scaling stretches the context)"),
    "model.rope_scaling.original_max_position_embeddings": POSITIVE,
    "model.rope_scaling.low_freq_factor": POSITIVE,
    "model.rope_scaling.high_freq_factor": POSITIVE,
    "model.rope_scaling.beta_fast": POSITIVE,
    "model.rope_scaling.beta_slow": POSITIVE,
    "model.rope_scaling.mscale": NON_NEGATIVE,
    "model.rope_scaling.mscale_all_dim": NON_NEGATIVE,
    "model.norm_eps": POSITIVE,
    "model.init_std": POSITIVE,
    "model.hidden_dropout": PROBABILITY,
    "model.attention_dropout": PROBABILITY,
    "model.moe.num_experts": NON_NEGATIVE,  # 0: dense
    "model.moe.ffn_hidden_size": POSITIVE,
    "model.moe.shared_expert_size": NON_NEGATIVE,  # 0: none
    "model.moe.layer_freq": POSITIVE,
    "model.moe.aux_loss_coeff": NON_NEGATIVE,
    "model.moe.z_loss_coeff": NON_NEGATIVE,
    "model.moe.expert_bias_update_rate": NON_NEGATIVE,
    "model.moe.capacity_factor": POSITIVE,  # null: dropless
    "parallel.tp": POSITIVE,
    "parallel.pp": POSITIVE,
    "parallel.vpp": POSITIVE,
    "parallel.micro_batch": POSITIVE,
    "parallel.global_batch": POSITIVE,
    "parallel.ep": POSITIVE,
    "parallel.cp": POSITIVE,
    "optim.lr": NON_NEGATIVE,  # 0: a step that changes nothing (tests resume weights unchanged)
    "optim.min_lr": NON_NEGATIVE,
    "optim.betas": PROBABILITY,
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.grad_clip": NON_NEGATIVE,  # 0: no clipping
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.decay_steps": POSITIVE,
    "optim.wsd_decay_fraction": FRACTION,
    "train.steps": NON_NEGATIVE,
    "train.seq_len": POSITIVE,
    "train.seed": NON_NEGATIVE,  # NumPy's seed
    "train.log_interval": POSITIVE,
    "train.eval_interval": NON_NEGATIVE,  # 0: no evaluation during training
    "train.eval_batches": POSITIVE,
    "train.peak_tflops": POSITIVE,
    "train.max_bad_steps": NON_NEGATIVE,
    "train.bad_step_window": POSITIVE,
    "train.spike.zscore": NON_NEGATIVE,  # null or 0: off
    "train.spike.window": Rule(lambda v: v >= 2, "must be at least 2 (a spread needs two steps)"),
    "train.spike.min_relative_std": POSITIVE,
    "train.spike.max_consecutive": NON_NEGATIVE,  # 0: no bound
    "train.spike.max_rewinds": NON_NEGATIVE,
    "train.straggler.factor": Rule(lambda v: v == 0 or v > 1, "must be 0 (off) or above 1"),
    "train.straggler.patience": POSITIVE,
    "data.seed": NON_NEGATIVE,
    "data.sources.weight": POSITIVE,
    "data.workers": NON_NEGATIVE,
    "data.max_skipped_fraction": FRACTION,
    "data.embedded_max_bytes": POSITIVE,
    "data.embedded_vocab_size": Rule(lambda v: v >= 258, "must be at least 258 (256 bytes + end of document)"),
    "checkpoint.interval": NON_NEGATIVE,  # 0: no periodic saves
    "checkpoint.interval_minutes": NON_NEGATIVE,  # 0: no saves by wall time
    "checkpoint.keep_last": NON_NEGATIVE,  # 0: all
    "checkpoint.keep_every": NON_NEGATIVE,  # 0: none
    "checkpoint.rewind": NON_NEGATIVE,
    "bench.steps": POSITIVE,
    "bench.repeats": POSITIVE,
    "bench.warmup": NON_NEGATIVE,
    "bench.profile_steps": NON_NEGATIVE,
    "eval.max_examples": POSITIVE,
    "cluster.nodes": POSITIVE,
    "cluster.gpus_per_node": POSITIVE,
    "fault.heartbeat_s": POSITIVE,
    "fault.setup_timeout_s": POSITIVE,
    "fault.checkpoint_timeout_s": POSITIVE,
    "fault.eval_timeout_s": POSITIVE,
    "fault.data_timeout_s": POSITIVE,
    "fault.step_timeout_s": POSITIVE,
    "fault.step_warmup": Rule(lambda v: v >= 2, "must be at least 2 (a percentile needs steps to take it over)"),
    "fault.step_timeout_factor": Rule(lambda v: v >= 1, "must be at least 1"),
    "fault.step_timeout_floor_s": POSITIVE,
    "fault.collective_timeout_s": POSITIVE,
    "fault.max_restarts_without_progress": NON_NEGATIVE,
}


def out_of_range(cfg: Config) -> list[str]:
    """One line per number of ``cfg`` that breaks its rule in RANGES, naming the field and its value."""
    return [
        f"{name}={value} {rule.words}"
        for path, rule in RANGES.items()
        for name, value in _numbers(cfg, path.split("."), "")
        if not rule.holds(value)
    ]


def _numbers(node: Any, keys: list[str], name: str):
    """(name, value) of the field at ``keys`` under ``node``, one per item where a list lies on the way."""
    if isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from _numbers(item, keys, f"{name}[{i}]")
    elif not keys:
        if node is not None:
            yield name, node
    else:
        yield from _numbers(getattr(node, keys[0]), keys[1:], f"{name}.{keys[0]}" if name else keys[0])


def check(cfg: Config, world_size: int) -> Layout:
    """Return the layout of ``cfg`` on ``world_size`` ranks or raise ConfigError naming the fields at fault."""
    model, par, train = cfg.model, cfg.parallel, cfg.train
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    problems.extend(out_of_range(cfg))
    need(par.zero in (0, 1, 2, 3), f"parallel.zero={par.zero} must be a ZeRO stage 0, 1, 2 or 3")
    need(cfg.optim.min_lr <= cfg.optim.lr, f"optim.min_lr={cfg.optim.min_lr} must not exceed optim.lr={cfg.optim.lr}")
    need(len(cfg.optim.betas) == 2, f"optim.betas={list(cfg.optim.betas)} must hold two numbers")
    need(
        not cfg.bench.host_syncs or train.log_interval > 1,
        "bench.host_syncs counts the host waits of a loop iteration that does not log: it needs train.log_interval "
        f"above 1 (got {train.log_interval})",
    )
    if problems:  # the rules below divide by these numbers
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    tp, cp, pp, vpp = par.tp, par.cp, par.pp, par.vpp or 1
    model_parallel = tp * cp * pp
    need(
        world_size % model_parallel == 0,
        f"world size {world_size} is not divisible by parallel.tp * parallel.cp * parallel.pp = {tp} * {cp} * {pp} "
        f"= {model_parallel}",
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
    chunks = 2 * cp * (tp if par.sp else 1)
    need(
        cp == 1 or train.seq_len % chunks == 0,
        f"train.seq_len={train.seq_len} is not divisible by 2 * parallel.cp{' * parallel.tp' if par.sp else ''} = "
        f"{chunks} (context parallelism splits each sequence into 2 * cp chunks"
        f"{', each split over tensor-parallel ranks by parallel.sp=true' if par.sp else ''})",
    )
    need(
        cp == 1 or model.attention == Attention.sdpa,
        f"parallel.cp={cp} needs model.attention=sdpa (megatron-core's unfused attention has no context parallelism)",
    )
    need(
        cp == 1 or model.attention_dropout == 0,
        f"parallel.cp={cp} with model.attention_dropout={model.attention_dropout}: context-parallel attention "
        "reruns its forward in backward, which would draw other dropout masks; set model.attention_dropout=0",
    )
    need(
        par.zero <= 1 or pp == 1,
        f"parallel.zero={par.zero} with parallel.pp={pp}: ZeRO stages 2 and 3 partition gradients during "
        "backward and cannot run under pipeline parallelism; use parallel.zero=0 or 1",
    )
    need(
        par.global_batch % (par.micro_batch * dp) == 0,
        f"parallel.global_batch={par.global_batch} is not divisible by parallel.micro_batch * data-parallel size "
        f"= {par.micro_batch} * {dp} (world size {world_size} / (tp {tp} * cp {cp} * pp {pp}))",
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
    _check_rope_scaling(model, need)
    need(
        model.position_embedding != PositionEmbedding.learned or train.seq_len <= model.max_position_embeddings,
        f"train.seq_len={train.seq_len} exceeds model.max_position_embeddings={model.max_position_embeddings} "
        "(learned position embeddings)",
    )
    need(
        train.fp8 is None or train.precision == Precision.bf16,
        f"train.fp8={getattr(train.fp8, 'value', train.fp8)} needs train.precision=bf16 "
        f"(not {train.precision.value}): FP8 matmuls take bf16 weights and activations",
    )
    need(not train.fp8_emulate or train.fp8 is not None, "train.fp8_emulate=true needs train.fp8 (hybrid or e4m3)")
    _check_optimizer(cfg.optim, par.zero, need)
    _check_fault(cfg.fault, need)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return Layout(world_size, tp, pp, vpp, dp, par.micro_batch, par.global_batch, par.ep, par.sp, par.zero, cp)


def _check_optimizer(optim: OptimConfig, zero: int, need: Callable[[bool, str], None]) -> None:
    """The optimizer exists and the installed DeepSpeed runs it correctly at this ZeRO stage."""
    kind = OPTIMIZERS.get(optim.name)
    if kind is None:
        reason = REFUSED.get(optim.name, f"unknown; choose one of {', '.join(OPTIMIZERS)}")
        need(False, f"optim.name={optim.name} is not offered: {reason}")
        return
    need(
        zero in kind.zero_stages,
        f"optim.name={optim.name} is not correct under parallel.zero={zero} "
        f"(stages it runs correctly at: {', '.join(map(str, kind.zero_stages))})",
    )


# The watchdog's timeouts (FaultConfig), each of the phase it bounds.
PHASE_TIMEOUTS = ("setup_timeout_s", "checkpoint_timeout_s", "eval_timeout_s", "data_timeout_s", "step_timeout_s")
# Heartbeats after a timeout by which the watchdog (gptscale/fault/watchdog.py) has reported the hang and ended
# the rank, or, when the store does not answer, ends it alone: one to notice, two to tell frozen ranks from slow
# ones, two for the stacks, five of grace for the store.
DETECTION_HEARTBEATS = 10


def _check_fault(fault: FaultConfig, need: Callable[[bool, str], None]) -> None:
    """The watchdog must end a hang before the collective timeout does (which names no stuck rank)."""
    if not fault.detect_hangs:
        return
    longest = max(PHASE_TIMEOUTS, key=lambda name: getattr(fault, name))
    need(
        fault.collective_timeout_s > getattr(fault, longest) + (DETECTION_HEARTBEATS + 1) * fault.heartbeat_s,
        f"fault.collective_timeout_s={fault.collective_timeout_s} must exceed fault.{longest}="
        f"{getattr(fault, longest)} plus {DETECTION_HEARTBEATS + 1} fault.heartbeat_s={fault.heartbeat_s} (the "
        "watchdog must find a hang before the collective timeout ends it without naming the stuck rank)",
    )
    need(
        fault.step_timeout_floor_s <= fault.step_timeout_s,
        f"fault.step_timeout_floor_s={fault.step_timeout_floor_s} must not exceed "
        f"fault.step_timeout_s={fault.step_timeout_s} (the most the learned step timeout may be)",
    )


def _check_data(data: DataConfig, need: Callable[[bool, str], None]) -> None:
    need(data.on_error in ("raise", "skip"), f"data.on_error={data.on_error!r} must be 'raise' or 'skip'")
    need(not (data.path and data.sources), "data.path and data.sources are exclusive: give one dataset or a list")


def _check_rope_scaling(model: ModelConfig, need: Callable[[bool, str], None]) -> None:
    """What megatron-core's scaled RoPE frequencies need to be defined."""
    scaling = model.rope_scaling
    if scaling.type == RopeScaling.none:
        return
    prefix = f"model.rope_scaling.type={scaling.type.value}"
    need(
        model.position_embedding == PositionEmbedding.rope,
        f"{prefix} needs model.position_embedding=rope (not {model.position_embedding.value})",
    )
    need(
        scaling.original_max_position_embeddings <= model.max_position_embeddings,
        f"model.rope_scaling.original_max_position_embeddings={scaling.original_max_position_embeddings} exceeds "
        f"model.max_position_embeddings={model.max_position_embeddings} (the extended context)",
    )
    if scaling.type == RopeScaling.llama3:
        need(
            scaling.low_freq_factor < scaling.high_freq_factor,
            f"{prefix}: model.rope_scaling.low_freq_factor={scaling.low_freq_factor} must be below "
            f"model.rope_scaling.high_freq_factor={scaling.high_freq_factor}",
        )
    else:
        need(
            scaling.beta_slow < scaling.beta_fast,
            f"{prefix}: model.rope_scaling.beta_slow={scaling.beta_slow} must be below "
            f"model.rope_scaling.beta_fast={scaling.beta_fast}",
        )


def _check_moe(model: ModelConfig, par: ParallelConfig, dp: int, fp8: bool, need: Callable[[bool, str], None]) -> None:
    """Mixture-of-experts rules: what megatron-core's MoE layers and DeepSpeed's engine can run."""
    moe, ep, tp = model.moe, par.ep, par.tp
    if moe.num_experts <= 0:
        need(ep == 1, f"parallel.ep={ep} needs a mixture-of-experts model (model.moe.num_experts is 0)")
        return
    experts = moe.num_experts
    need(
        experts % ep == 0,
        f"model.moe.num_experts={experts} is not divisible by parallel.ep={ep} (each rank holds experts / ep)",
    )
    need(
        dp % ep == 0,
        f"parallel.ep={ep} does not divide the data-parallel size {dp} "
        "(world size / (parallel.tp * parallel.cp * parallel.pp)): "
        "expert-parallel ranks are carved out of the data-parallel ranks",
    )
    need(
        1 <= moe.top_k <= experts, f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={experts}"
    )
    need(
        tp == 1 or par.sp,
        f"parallel.tp={tp} with a mixture-of-experts model needs parallel.sp=true "
        "(megatron-core's MoE layers require sequence parallelism under tensor parallelism)",
    )
    expert_ffn = model.expert_ffn_size
    need(expert_ffn % tp == 0, f"model.moe.ffn_hidden_size={expert_ffn} is not divisible by parallel.tp={tp}")
    need(
        moe.shared_expert_size % tp == 0,
        f"model.moe.shared_expert_size={moe.shared_expert_size} is not divisible by parallel.tp={tp}",
    )
    need(
        not moe.shared_expert_gate or moe.shared_expert_size > 0,
        "model.moe.shared_expert_gate=true needs a shared expert (model.moe.shared_expert_size > 0)",
    )
    need(
        not (moe.pre_softmax and moe.expert_bias),
        "model.moe.pre_softmax=true and model.moe.expert_bias=true are exclusive: expert biases use sigmoid "
        "scores, not a softmax",
    )
    need(
        not model.bias or tp == 1,
        f"model.bias=true with a mixture-of-experts model and parallel.tp={tp}: megatron-core's experts take "
        "biases only without tensor parallelism",
    )
    need(
        par.zero < 3 or ep == 1,
        f"parallel.zero=3 with parallel.ep={ep}: ZeRO-3 partitions the experts over the full data-parallel group "
        "and counts the dense copies twice in the gradient norm; use parallel.zero=0, 1 or 2",
    )
    need(not fp8, "train.fp8 with a mixture-of-experts model (model.moe.num_experts > 0) is not supported")
