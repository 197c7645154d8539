"""A step-time estimate: matmul flops at an assumed share of the device's peak, the pipeline bubble, and
each collective's volume over the link it crosses at an assumed share of its bandwidth, none overlapped.

Flops per token are the trainer's own count (``gptscale.model.flops.flops_per_token``: 6N plus the
attention scores); recomputation adds a forward (full) or the attention scores' forward (selective).
Volumes per rank and step (``w`` the weights' bytes, m micro-batches, L/pp layers per rank):

- TP: 4 all-reduces of the layer's activations per layer and micro-batch (2 forward, 2 backward; 6 with
  full recomputation), ring volume 2(tp-1)/tp of s*b*h*w each; with sequence parallelism the same volume
  as all-gathers and reduce-scatters.
- PP: one send of activations forward and one of gradients back per micro-batch and model chunk.
- DP (DeepSpeed, ``overlap_comm`` off): ZeRO-0 all-reduces gradients, ZeRO-1/2 reduce-scatter gradients
  and all-gather updated weights, ZeRO-3 all-gathers weights in forward and backward and reduce-scatters
  gradients; each (dp-1)/dp of the rank's parameters' bytes per pass.
- EP: 2 all-to-alls forward and 2 backward per MoE layer of the routed tokens, (ep-1)/ep of them.
- CP: per layer and micro-batch an all-gather of keys and values forward (again when recomputed), and
  backward another all-gather and a reduce-scatter of their gradients, (cp-1)/cp of the whole sequence's
  keys and values each; backward also reruns the attention scores' forward. Every other volume above is
  of the rank's own tokens, 1/cp of each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptscale.config.layout import Layout
from gptscale.config.schema import Config, Precision, Recompute, is_moe_layer
from gptscale.config.validate import padded_vocab_size
from gptscale.model.flops import flops_per_token
from gptscale.plan.cluster import Cluster

COMPUTE_EFFICIENCY = 0.5  # share of peak dense matmul throughput a well-tuned layer reaches
BANDWIDTH_EFFICIENCY = 0.7  # share of a link's bandwidth NCCL's ring collectives reach


@dataclass(frozen=True)
class Collective:
    kind: str  # e.g. "TP all-reduce"
    link: str  # "intra-node" | "inter-node"
    bytes_per_step: float  # what one rank sends per step
    seconds: float


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    bubble_s: float
    collectives: list[Collective] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.bubble_s + sum(c.seconds for c in self.collectives)


def estimate(cfg: Config, layout: Layout, cluster: Cluster, vocab_size: int, rank_numel: int) -> StepTime:
    """Seconds per optimizer step of ``layout`` on ``cluster``; ``rank_numel``: parameters one rank holds."""
    model, train = cfg.model, cfg.train
    vocab = padded_vocab_size(vocab_size, model.vocab_multiple)
    per_token = flops_per_token(model, vocab, train.seq_len)
    attention_scores = per_token - flops_per_token(model, vocab, 0)
    if train.activation_checkpointing == Recompute.full:
        per_token *= 4 / 3
    elif train.activation_checkpointing == Recompute.selective:
        per_token += attention_scores / 3
    if layout.cp > 1:
        per_token += attention_scores / 3
    tokens = layout.global_batch * train.seq_len
    peak = cluster.gpu.peak_flops(train.precision)
    compute = per_token * tokens / (layout.world_size * peak * COMPUTE_EFFICIENCY)
    micro = layout.num_microbatches
    bubble = compute * (layout.pp - 1) / (micro * layout.vpp)

    w = 2 if train.precision == Precision.bf16 else 4
    cp = layout.cp
    activation = train.seq_len // cp * layout.micro_batch * model.hidden_size * w
    layers = model.num_layers // layout.pp
    bandwidth = {
        "intra-node": cluster.gpu.intra_node_gbps * 1e9 * BANDWIDTH_EFFICIENCY,
        "inter-node": cluster.gpu.inter_node_gbps * 1e9 * BANDWIDTH_EFFICIENCY,
    }
    collectives = []

    def add(kind: str, stride: int, size: int, volume: float) -> None:
        """A collective of groups of ``size`` ranks ``stride`` apart (megatron-core's rank order)."""
        if volume > 0:
            link = cluster.link(stride, size)
            collectives.append(Collective(kind, link, volume, volume / bandwidth[link]))

    tp = layout.tp
    passes = 6 if train.activation_checkpointing == Recompute.full else 4
    add(
        "TP all-gather/reduce-scatter" if cfg.parallel.sp else "TP all-reduce",
        1,
        tp,
        micro * layers * passes * 2 * (tp - 1) / tp * activation,
    )
    head_dim = model.hidden_size // model.num_attention_heads
    keys_values = 2 * train.seq_len * layout.micro_batch * model.query_groups // tp * head_dim * w
    gathers = 4 if train.activation_checkpointing != Recompute.none else 3
    add("CP all-gather/reduce-scatter (keys, values)", tp, cp, micro * layers * gathers * (cp - 1) / cp * keys_values)
    sent = activation / tp if cfg.parallel.sp else activation
    add("PP send/recv", tp * cp * layout.dp, layout.pp, (layout.pp > 1) * micro * layout.vpp * 2 * sent)
    dp = layout.expert_dp
    share = (dp - 1) / dp * rank_numel * w
    zero = cfg.parallel.zero
    if zero == 0:
        add("DP all-reduce (gradients)", tp, layout.dp * cp, 2 * share)
    elif zero in (1, 2):
        add("DP reduce-scatter (gradients)", tp, layout.dp * cp, share)
        add("DP all-gather (weights)", tp, layout.dp * cp, share)
    else:
        add("DP all-gather (weights, forward and backward)", tp, layout.dp * cp, 2 * share)
        add("DP reduce-scatter (gradients)", tp, layout.dp * cp, share)
    ep = layout.ep
    moe_layers = sum(is_moe_layer(model, i) for i in range(model.num_layers)) // layout.pp
    routed = activation * model.moe.top_k / (tp if cfg.parallel.sp else 1)
    # Experts have their own rank order, with context-parallel ranks folded into expert data parallelism
    # (megatron-core's expert rank generator has cp=1): an expert-parallel group's ranks are tp apart.
    add("EP all-to-all", tp, ep, micro * moe_layers * 4 * (ep - 1) / ep * routed)
    return StepTime(compute, bubble, collectives)
