"""Activation bytes per micro-batch: what autograd saves for backward, measured on the model itself.

``SavedBytes`` counts the tensors autograd keeps for backward (unique storages; weights are not
activations). The plan runs the configured layers on the meta device, where tensors have shapes and
dtypes but no data, inside a fake process group: recomputation, sequence parallelism, the loss layer's
logits and whatever megatron-core saves are counted as the code does it, not as a formula says. Tests run
the same counter in a real forward.

A stage's bytes are composed from three measurements of small models of the configured shape (pipelines
of two stages of one and of two layers): what the first stage adds (embedding), what one layer adds, and
what the last stage adds (final norm, output layer, logits and the loss). All are linear in the
micro-batch, which is measured at 1 sequence and scaled. Mixture-of-experts layers route tokens by their
values, which the meta device cannot compute: they run as under a perfectly balanced router (each token to
``top_k`` experts, every expert an equal share; ``meta.on_meta(top_k)``), measured at one expert-parallel rank,
whose experts then see the same number of token-expert pairs as each rank does under expert parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state

from gptscale.config.layout import Layout
from gptscale.config.schema import Backend, Config, Precision, Recompute
from gptscale.model.build import build_model
from gptscale.parallel.context import this_rank_positions
from gptscale.plan.counts import fake_groups, shape_key
from gptscale.plan.meta import on_meta


class SavedBytes:
    """Bytes of the tensors autograd saves inside the ``with`` block, each storage once, weights left out."""

    def __init__(self, weights=()):
        self.weights = {_storage_key(w) for w in weights}
        self.storages: dict[int, int] = {}

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self.weights:
            self.storages[key] = tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _storage_key(tensor: torch.Tensor) -> int:
    # The storage's identity: data pointers are all zero on the meta device, the storage object is not.
    return tensor.untyped_storage()._cdata


def forward_saved_bytes(
    chunk: torch.nn.Module,
    micro_batch: int,
    seq_len: int,
    vocab_size: int,
    device: torch.device,
    tokens: torch.Tensor | None = None,
) -> int:
    """Bytes autograd saves in one forward of one micro-batch through ``chunk`` (a megatron-core GPTModel).

    A chunk that does not start the model gets its input as the pipeline schedule gives it (sequence-first
    hidden states, split over tensor-parallel ranks under sequence parallelism, requiring grad). Under
    context parallelism the rank runs its share of the sequence (``tokens``: the whole sequences).
    """
    config = chunk.config
    held = this_rank_positions(seq_len, device)
    if tokens is None:
        tokens = torch.zeros(micro_batch, seq_len, dtype=torch.long, device=device)
    tokens = tokens.index_select(1, held)
    positions = held.expand(micro_batch, len(held))
    if not chunk.pre_process:
        tp = parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
        hidden = torch.zeros(
            len(held) // tp,
            micro_batch,
            config.hidden_size,
            dtype=config.params_dtype,
            device=device,
            requires_grad=True,
        )
        chunk.set_input_tensor(hidden)
    with SavedBytes(chunk.parameters()) as saved:
        chunk(tokens, positions, None, labels=tokens if chunk.post_process else None)
    return saved.total


@dataclass(frozen=True)
class ActivationParts:
    """Bytes saved per micro-batch of one sequence: by the first stage's extras, per layer, by the last's."""

    first: int
    per_layer: int
    last: int

    def stage(self, layers: int, first: bool, last: bool, micro_batch: int) -> int:
        return round(micro_batch * (layers * self.per_layer + first * self.first + last * self.last))


_parts: dict[tuple, ActivationParts] = {}


def activation_parts(cfg: Config, layout: Layout, vocab_size: int) -> ActivationParts:
    """Measure (once per shape-deciding setting) the parts a stage's activations are made of. Expert
    parallelism is not one: under balanced routing each rank's experts get tokens x top_k pairs at any
    expert-parallel size, so MoE layers are measured at one. Context parallelism is: a rank holds 1 / cp of
    each sequence's activations."""
    key = (shape_key(cfg), layout.tp, layout.cp, cfg.parallel.sp, cfg.train.activation_checkpointing, vocab_size)
    if key not in _parts:
        one = _stage_bytes(cfg, layout.tp, layout.cp, vocab_size, 2, (0, 1))
        two = _stage_bytes(cfg, layout.tp, layout.cp, vocab_size, 4, (0,))
        per_layer = two[0] - one[0]
        _parts[key] = ActivationParts(first=one[0] - per_layer, per_layer=per_layer, last=one[1] - per_layer)
    return _parts[key]


def _stage_bytes(cfg: Config, tp: int, cp: int, vocab_size: int, num_layers: int, stages) -> list[int]:
    """Saved bytes of ``stages`` of a two-stage pipeline of ``num_layers`` layers (one sequence, ``tp`` x ``cp``
    ranks per stage, one expert-parallel rank)."""
    model = replace(cfg.model, num_layers=num_layers)
    parallel = replace(cfg.parallel, tp=tp, cp=cp, pp=2, vpp=None, ep=1, zero=0, micro_batch=1, global_batch=1)
    shape = Layout(world_size=2 * tp * cp, tp=tp, pp=2, vpp=1, dp=1, micro_batch=1, global_batch=1, cp=cp)
    saved = []
    for stage in stages:
        with fake_groups(shape, tp * cp * stage):
            with on_meta(cfg.model.moe.top_k if cfg.model.moe.num_experts else None):
                chunks = build_model(model, parallel, cfg.train, vocab_size, Backend.local, torch.device("meta"))
                chunks.train()
                if cfg.train.precision == Precision.bf16:
                    chunks.bfloat16()  # as DeepSpeed's bf16 engine casts the module (learned positions are fp32)
                saved.append(
                    forward_saved_bytes(chunks.chunks[0], 1, cfg.train.seq_len, vocab_size, torch.device("meta"))
                )
    return saved


def in_flight(layout: Layout, pp_rank: int) -> float:
    """Micro-batches whose activations a stage holds at once, in units of the stage's whole forward.

    megatron-core's 1F1B runs ``pp - rank - 1`` warm-up forwards before its first backward, so stage
    ``rank`` holds ``pp - rank`` micro-batches (the first stage the most); the interleaved schedule warms up
    with ``(pp - rank - 1) * 2 + (vpp - 1) * pp`` chunk forwards, each a ``1/vpp`` of the stage. Never more
    than the step's micro-batches; without pipelining one micro-batch at a time.
    """
    pp, vpp, micro = layout.pp, layout.vpp, layout.num_microbatches
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp - pp_rank, micro))
    warmup = (pp - pp_rank - 1) * 2 + (vpp - 1) * pp
    return min(warmup + 1, micro * vpp) / vpp


def stage_activation_bytes(cfg: Config, layout: Layout, vocab_size: int, pp_rank: int) -> tuple[int, int]:
    """(one micro-batch's saved bytes, peak bytes) of stage ``pp_rank``: its layers (megatron-core's even
    split), the embedding on the first stage, the loss layer on the last. The peak holds the schedule's
    in-flight micro-batches and, under full recomputation, the one layer whose forward is rerun during
    backward with everything saved, less the loss layer's tensors, which that backward has freed by then."""
    parts = activation_parts(cfg, layout, vocab_size)
    layers = cfg.model.num_layers // layout.pp
    last = pp_rank == layout.pp - 1
    one = parts.stage(layers, pp_rank == 0, last, layout.micro_batch)
    rerun = 0
    if cfg.train.activation_checkpointing == Recompute.full:
        plain = replace(cfg, train=replace(cfg.train, activation_checkpointing=Recompute.none))
        rerun = layout.micro_batch * (activation_parts(plain, layout, vocab_size).per_layer - last * parts.last)
    return one, math.ceil(one * in_flight(layout, pp_rank)) + max(rerun, 0)
