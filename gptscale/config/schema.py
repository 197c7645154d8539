"""Typed schema of every Hydra group.

Hydra merges the YAML files of conf/ into these dataclasses, so a misspelt key or a value of the wrong
type fails at start-up with the key's full name. Layout rules that involve several groups (world size,
divisibility) live in ``gptscale.config.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional


class PositionEmbedding(str, Enum):
    learned = "learned"
    rope = "rope"


class RopeScaling(str, Enum):
    """How RoPE's frequencies are stretched to run a model past the context it was trained at."""

    none = "none"
    llama3 = "llama3"  # Llama 3.1: long wavelengths divided by the factor, short ones kept, a ramp between
    yarn = "yarn"  # YaRN: a ramp by rotations over the original context, and a softmax temperature


class Normalization(str, Enum):
    LayerNorm = "LayerNorm"
    RMSNorm = "RMSNorm"


class Activation(str, Enum):
    gelu = "gelu"
    swiglu = "swiglu"


class Backend(str, Enum):
    auto = "auto"
    local = "local"
    te = "te"


class Attention(str, Enum):
    """Core attention kernel of the local layer spec."""

    sdpa = "sdpa"  # torch scaled_dot_product_attention (flash / memory-efficient kernels on GPU)
    unfused = "unfused"  # megatron-core's DotProductAttention: materialises the T x T scores


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Fp8Format(str, Enum):
    """FP8 number formats, as Transformer Engine names them."""

    hybrid = "hybrid"  # e4m3 for weights and activations, e5m2 (wider range) for gradients
    e4m3 = "e4m3"  # e4m3 everywhere


class Fp8Recipe(str, Enum):
    """How FP8 scales are chosen."""

    tensorwise = "tensorwise"  # one scale per tensor from its current amax (TE and torchao)
    delayed = "delayed"  # scales from an amax history (Transformer Engine only)


class Recompute(str, Enum):
    none = "none"
    selective = "selective"
    full = "full"


class LrSchedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    wsd = "wsd"
    constant = "constant"


class ScheduleOnResume(str, Enum):
    """What the lr schedule does when a run resumes with another ``train.steps`` than it was saved with."""

    keep = "keep"  # follow the saved schedule; past its end the lr stays at min_lr
    stretch = "stretch"  # the schedule of the new train.steps, as if the run had always had it (the lr jumps)
    restart = "restart"  # a new warm-up and decay from the resume step to the new train.steps
    extend = "extend"  # hold the lr of the resume step, then decay to min_lr over the last wsd_decay_fraction


class Dispatcher(str, Enum):
    """How megatron-core's MoE layer moves tokens to the ranks holding their experts."""

    alltoall = "alltoall"  # each token goes only to its experts' ranks (the choice at scale)
    allgather = "allgather"  # every rank sees every token and keeps those of its experts


class SpikeSignal(str, Enum):
    """Which values make a loss spike (``train.spike``): a healthy run's grad norm alone jumps several-fold."""

    loss = "loss"  # the loss above its limit (the grad norm is watched and logged)
    both = "both"  # the loss and the grad norm, both above their limits
    either = "either"  # the loss or the grad norm


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class MoeConfig:
    """Mixture-of-experts MLPs (megatron-core's router, token dispatcher and experts); num_experts=0: dense."""

    num_experts: int = 0  # routed experts per MoE layer; 0: a dense model
    top_k: int = 2  # experts each token is routed to
    pre_softmax: bool = False  # softmax over all experts, then top-k (no renormalisation); Mixtral: false
    ffn_hidden_size: Optional[int] = None  # per expert; None: model.ffn_hidden_size
    shared_expert_size: int = 0  # hidden size of an expert every token also passes through; 0: none
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output is scaled by a sigmoid gate
    layer_freq: int = 1  # layer i is a MoE layer when i % layer_freq == 0 (1: every layer)
    aux_loss_coeff: float = 1e-2  # load-balancing loss weight (Switch/GShard)
    z_loss_coeff: float = 0.0  # router z-loss weight (ST-MoE)
    expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3): sigmoid scores, a bias nudged to balance
    expert_bias_update_rate: float = 1e-3  # how far each step nudges the expert biases
    capacity_factor: Optional[float] = None  # tokens an expert takes, times its fair share; None: dropless
    dispatcher: Dispatcher = Dispatcher.alltoall  # alltoall | allgather: how tokens reach their experts


@dataclass
class RopeScalingConfig:
    """RoPE scaling for context extension (megatron-core's Llama 3 and YaRN frequencies); needs rope positions."""

    type: RopeScaling = RopeScaling.none  # none | llama3 | yarn
    factor: float = 8.0  # the scaled RoPE covers this many times the original context
    original_max_position_embeddings: int = 8192  # the context the model was trained at before scaling
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original / high_freq_factor are kept
    beta_fast: float = 32.0  # yarn: dimensions turning more than beta_fast times over the original context are kept
    beta_slow: float = 1.0  # yarn: dimensions turning fewer than beta_slow times are divided by factor
    mscale: float = 1.0  # yarn: attention temperature (0.1 mscale ln(factor) + 1) ...
    mscale_all_dim: float = 0.0  # yarn: ... / (0.1 mscale_all_dim ln(factor) + 1)


@dataclass
class ModelConfig:
    """Shape and architecture of a GPT; presets live in conf/model/."""

    name: str = "gpt2-tiny"  # the preset's name (run_dir and logs use it)
    num_layers: int = 4  # transformer layers
    hidden_size: int = 64  # width of the residual stream
    num_attention_heads: int = 4  # attention heads per layer
    num_query_groups: Optional[int] = None  # None: one key/value head per query head
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    vocab_size: int = 50257  # used when the data brings no tokenizer (synthetic benchmarks)
    vocab_multiple: int = 128  # embedding rows are padded to a multiple of this (independent of tp)
    max_position_embeddings: int = 1024  # longest sequence the position embedding covers
    position_embedding: PositionEmbedding = PositionEmbedding.learned  # learned (GPT-2) | rope (Llama)
    rotary_base: float = 10000.0  # RoPE base frequency
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # context extension (rope only)
    normalization: Normalization = Normalization.LayerNorm  # LayerNorm | RMSNorm
    norm_eps: float = 1e-5  # epsilon of the norms
    activation: Activation = Activation.gelu  # gelu | swiglu
    bias: bool = True  # biases on linear layers
    tie_embeddings: bool = True  # the output layer shares the input embedding's weight
    init_std: float = 0.02  # std of the normal initialisation (output projections scaled by depth)
    hidden_dropout: float = 0.0  # dropout after attention and MLP
    attention_dropout: float = 0.0  # dropout of attention probabilities
    backend: Backend = Backend.auto  # auto | local | te (Transformer Engine); auto: te on GPU when installed
    attention: Attention = Attention.sdpa  # sdpa (fused) | unfused
    qkv_bias: bool = False  # biases on the query/key/value projection even when model.bias is false (Qwen)
    moe: MoeConfig = field(default_factory=MoeConfig)

    @property
    def ffn_size(self) -> int:
        """The dense MLP's hidden size (``ffn_hidden_size``, null: 4 x hidden)."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def query_groups(self) -> int:
        """Key/value head groups (``num_query_groups``, null: one per head, i.e. no grouping)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def expert_ffn_size(self) -> int:
        """Each expert's MLP hidden size (``moe.ffn_hidden_size``, null: the dense one)."""
        return self.moe.ffn_hidden_size or self.ffn_size


def is_moe_layer(model: ModelConfig, index: int) -> bool:
    """Whether layer ``index`` (0-based, global) has a mixture-of-experts MLP rather than a dense one."""
    return model.moe.num_experts > 0 and index % model.moe.layer_freq == 0


@dataclass
class ParallelConfig:
    """How the model and the batch are split over ranks; data parallel size is what remains."""

    tp: int = 1  # tensor parallel ranks
    pp: int = 1  # pipeline stages
    vpp: Optional[int] = None  # virtual pipeline stages (model chunks) per pipeline rank
    sp: bool = False  # sequence parallel (needs tp > 1)
    zero: int = 0  # DeepSpeed ZeRO stage 0..3
    micro_batch: int = 4  # sequences per rank per forward pass
    global_batch: int = 16  # sequences per optimizer step, all ranks together
    ep: int = 1  # expert parallel: each MoE layer's experts split over this many data-parallel ranks
    cp: int = 1  # context parallel: each sequence split over this many ranks (attention sees all of it)


@dataclass
class OptimConfig:
    """The optimizer (by name, ``gptscale/optim``) and its learning-rate schedule."""

    name: str = "adamw"  # adamw | lion: conf/optim/NAME.yaml, gptscale/optim/
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-4  # learning rate at the end of the decay
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's beta1, beta2
    eps: float = 1e-8  # AdamW's epsilon (Lion has none)
    weight_decay: float = 0.1  # decoupled weight decay (not on biases and norms)
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: LrSchedule = LrSchedule.cosine  # cosine | linear | wsd | constant
    warmup_steps: int = 20  # linear warm-up steps from 0 to lr
    decay_steps: Optional[int] = None  # steps from the end of warm-up to min_lr; None: until train.steps
    wsd_decay_fraction: float = 0.2  # warmup-stable-decay: share of the steps spent decaying
    # Resuming with another train.steps (decay_steps null): keep | stretch | restart | extend; null refuses
    # to guess and names the choices.
    on_new_steps: Optional[ScheduleOnResume] = None


@dataclass
class SpikeConfig:
    """Loss spikes: a step whose loss exceeds the rolling median + zscore robust stds is skipped."""

    zscore: Optional[float] = 6.0  # robust stds above the median; null or 0: off (non-finite steps are still skipped)
    window: int = 50  # past non-skipped steps the median and robust std are taken over; detection starts once full
    min_relative_std: float = 0.01  # the robust std is at least this share of the median (a calm window)
    signal: SpikeSignal = SpikeSignal.loss  # what must exceed its limit: the loss, both or either with the grad norm
    max_consecutive: int = 5  # after this many spikes in a row the run rewinds, or if it cannot, goes on (0: no bound)
    max_rewinds: int = 3  # automatic rewinds a run may make (RUN_DIR/rewinds.jsonl); after them streaks go on


@dataclass
class StragglerConfig:
    """Stragglers: at each log step every rank's forward compute and data wait per step are compared with the
    other ranks of its pipeline stage (docs/goodput.md)."""

    factor: float = 1.5  # a rank this many times slower than the median of the others is slow; 0: off (no all-gather)
    patience: int = 3  # log intervals in a row a rank must be slow to be named a straggler


@dataclass
class TrainConfig:
    steps: int = 600  # optimizer steps of the run
    seq_len: int = 128  # tokens per sequence
    precision: Precision = Precision.fp32  # fp32 | bf16
    activation_checkpointing: Recompute = Recompute.none  # none | selective | full
    seed: int = 1234  # weights, dropout and RNG streams
    log_interval: int = 10  # steps between log lines and metrics records
    eval_interval: int = 200  # 0: no evaluation during training
    eval_batches: int = 4  # global batches of held-out data per evaluation
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: look the device up
    device: str = "auto"  # auto | cpu | cuda
    max_bad_steps: int = 5  # steps with a non-finite loss or grad norm are skipped; more than this many ...
    bad_step_window: int = 100  # ... within this many steps stop the run
    fp8: Optional[Fp8Format] = None  # FP8 matmuls (needs precision=bf16): TE with backend te, torchao with local
    fp8_recipe: Fp8Recipe = Fp8Recipe.tensorwise  # tensorwise | delayed (delayed: Transformer Engine only)
    fp8_emulate: bool = False  # torchao only: FP8 numerics without FP8 hardware (CPU tests; no speed-up)
    compile: bool = False  # torch.compile each transformer layer (not the whole model); measure before using
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)


@dataclass
class DataSourceConfig:
    path: str = "???"  # a dataset written by gptscale-prepare: directory, URL prefix or pipe: template with {}
    weight: float = 1.0


@dataclass
class DataConfig:
    """Where tokens come from. Without a path the embedded corpus (the standard library's source) is used."""

    path: Optional[str] = None  # a dataset written by gptscale-prepare: directory, URL prefix or pipe: template with {}
    sources: List[DataSourceConfig] = field(default_factory=list)  # several datasets blended by weight
    seed: int = 1234  # shard and document order
    on_error: str = "raise"  # raise | skip: what a corrupt or missing shard does
    max_skipped_fraction: float = 0.01  # on_error=skip: stop when skipped shards hold more of the tokens read
    workers: int = 0  # loader processes per rank; 0 reads in the training process
    reset_attention_at_eod: bool = False  # documents attend only to themselves; positions restart
    embedded_max_bytes: int = 4_000_000  # size of the embedded corpus
    embedded_vocab_size: int = 4096  # its byte-level BPE, trained on it once and cached
    cache_dir: Optional[str] = None  # None: $GPTSCALE_CACHE or ~/.cache/gptscale
    packing: bool = True  # fine-tuning data: several whole conversations per sequence (false: one, padded)
    truncate_long: bool = False  # fine-tuning data: cut a conversation longer than a sequence (else data.on_error)
    exclude: List[str] = field(default_factory=list)  # never trained on: FINGERPRINT:SHARD:INDEX, or files of them


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0: no periodic saves (one at the end still happens unless save_final is false)
    interval_minutes: float = 30.0  # also save when this much wall time passed since the last save; 0: off
    keep_last: int = 2  # newest checkpoints kept; 0: all
    keep_every: int = 0  # also keep every K-th step's checkpoint; 0: none
    resume: str = "auto"  # auto | none | PATH
    save_final: bool = True  # save when the run ends
    async_save: bool = True  # write in the background: training waits only for the snapshot to host memory
    rewind: Optional[int] = None  # at start: the newest checkpoint at or before this step, recorded spikes excluded


@dataclass
class FaultConfig:
    """Hangs and restarts (docs/faults.md): a watchdog thread per rank ends a job whose progress stops in a
    phase for longer than that phase's timeout, naming the stuck ranks, well before the collective timeout."""

    detect_hangs: bool = True  # run the watchdog; false: only the collective timeout ends a hang
    heartbeat_s: float = 2.0  # how often each rank publishes its phase and step in the job's store
    setup_timeout_s: float = 1200.0  # start-up: process groups, data, model, engine (checkpoint load apart)
    checkpoint_timeout_s: float = 1200.0  # one checkpoint save or load
    eval_timeout_s: float = 1200.0  # one evaluation
    data_timeout_s: float = 600.0  # one wait for the next batch
    step_timeout_s: float = 1200.0  # a step before warm-up, and the most the learned step timeout may be
    step_warmup: int = 10  # steps timed before the step timeout is learned from them
    step_timeout_factor: float = 10.0  # learned step timeout: this times the 99th percentile of recent steps ...
    step_timeout_floor_s: float = 120.0  # ... and at least this
    collective_timeout_s: float = 1800.0  # the process groups' timeout: above every timeout of the watchdog
    max_restarts_without_progress: int = 2  # in-job restarts in a row without a new checkpoint; then exit 76


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.disabled  # online | offline | disabled
    project: str = "gptscale"  # W&B project
    entity: Optional[str] = None  # W&B team or user; None: the API key's default
    group: Optional[str] = None  # W&B group (a sweep's runs side by side)
    name: Optional[str] = None  # W&B run name; None: the run directory's name
    tags: List[str] = field(default_factory=list)  # W&B tags


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False  # also write TensorBoard event files into run_dir
    level: str = "INFO"  # rank 0's log level; other ranks log warnings and errors


@dataclass
class BenchConfig:
    """gptscale-bench: timed steps on synthetic tokens, after untimed warm-up steps."""

    steps: int = 10  # timed optimizer steps
    warmup: int = 3  # untimed steps first (allocator, kernels, DeepSpeed's first-step work)
    repeats: int = 3  # timed windows of `steps` steps: the median is reported, the spread beside it
    profile_steps: int = 0  # extra steps under torch.profiler after the timed ones; 0: no profile
    host_syncs: bool = False  # one extra step that lists where the host waits for the device
    output: Optional[str] = None  # append one JSON line per config to this file


@dataclass
class TaskConfig:
    """What a run is for: ``pretrain`` from scratch, or ``sft`` (supervised fine-tuning) from a checkpoint."""

    name: str = "pretrain"  # pretrain | sft
    init: Optional[str] = None  # checkpoint (or HF import) whose weights start the run; optimizer and data start fresh


@dataclass
class EvalConfig:
    """Multiple-choice tasks scored by ``gptscale-eval`` and at ``train.eval_interval`` during training."""

    tasks: List[str] = field(default_factory=list)  # JSONL files of {context, choices, answer}
    max_examples: Optional[int] = None  # per task; None: all of them


@dataclass
class ClusterConfig:
    """The machines a layout is planned for (``gptscale-plan``); GPU names are listed in gptscale/plan/cluster.py."""

    nodes: int = 1  # machines
    gpus_per_node: int = 8  # GPUs per machine
    gpu: str = "h100"  # h100 | h200 | a100 | a100-40 | l40s | ...


@dataclass
class Config:
    run_dir: str = "runs/${model.name}"  # logs, metrics.jsonl and checkpoints
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
