"""One optimizer step, top to bottom.

Without pipelining each micro-batch runs forward and ``engine.backward``, and the engine (DeepSpeed, behind
``parallel/engine``) reduces gradients over data-parallel ranks at the last one. With pipelining
megatron-core's schedule (1F1B, or interleaved 1F1B with virtual stages) runs every micro-batch's forward and
backward across stages; then the tied embedding's gradients are summed over the first and last stage. Either
way one ``engine.update`` follows, given the step's global loss: it clips, decides on the device whether to
skip the update, and updates. This is how DeepSpeed's own pipeline engine composes with ZeRO, and why
ZeRO-2/3 (which reduce inside backward) are refused with pipelining.

The loss is the mean over every unmasked token of the global batch, whatever the layout: each micro-batch
contributes its summed token losses divided by the global token count. A mean of per-micro-batch means
would instead give the tokens of a short or empty sequence (a document's end, an epoch's last step) more
weight, and make the result depend on how the batch is split into micro-batches and ranks. Under context
parallelism each rank holds part of every sequence (``gptscale.parallel.context``): its tokens are counted
and its losses summed like a data-parallel rank's, so the figure is the same.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from gptscale.config.layout import Layout
from gptscale.data.batch import document_attention_mask
from gptscale.model.build import ModelChunks
from gptscale.model.moe import set_aux_loss_scale
from gptscale.parallel.context import split_batch, this_rank_positions
from gptscale.parallel.engine import Engine, UpdateLimits
from gptscale.parallel.grads import all_reduce_tied_embedding_grads
from gptscale.train.router_metrics import aux_losses, clear_tracker, weighted_aux_loss
from gptscale.train.stragglers import RankTimes

UNTIMED = RankTimes(None)


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss per token over the global batch, the same on every rank
    grad_norm: Optional[torch.Tensor]  # before clipping
    aux: Optional[torch.Tensor] = None  # router losses as weighted in the objective (MoE models), every rank
    router_losses: Optional[dict] = None  # per-layer unweighted load-balancing loss and z-loss (MoE models)
    skipped: Optional[torch.Tensor] = None  # 1.0 when the update gate skipped the update; None: DeepSpeed did


def _to_device(batch: dict, device: torch.device) -> dict:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def _on_this_rank(batch: dict, device: torch.device) -> dict:
    """The micro-batch on the device, cut to this rank's share of each sequence under context parallelism."""
    return split_batch(_to_device(batch, device))


def _load(batches: Iterator[dict], layout: Layout, device: torch.device, times: RankTimes = UNTIMED) -> list[dict]:
    microbatches = []
    for _ in range(layout.num_microbatches):
        with times.data():
            microbatches.append(_on_this_rank(next(batches), device))
    return microbatches


def _global_tokens(microbatches: list[dict], layout: Layout, is_last_stage: bool) -> torch.Tensor:
    """Unmasked tokens in the global batch: this rank's micro-batches summed over data-parallel and
    context-parallel ranks.

    Only the last stage computes a loss; the others skip the all-reduce (a data-parallel group never
    spans pipeline stages, so every member of it decides alike).
    """
    tokens = torch.stack([batch["loss_mask"].sum() for batch in microbatches]).sum().float()
    if layout.dp * layout.cp > 1 and is_last_stage:
        dist.all_reduce(tokens, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return tokens.clamp(min=1)


def attention_mask(batch: dict) -> Optional[torch.Tensor]:
    """The document mask when documents are kept apart, built where the micro-batch runs and only then: the
    rows of this rank's tokens (all of them without context parallelism)."""
    if "document_ids" not in batch:
        return None
    document_ids = batch["document_ids"]
    queries = (
        this_rank_positions(document_ids.shape[1], document_ids.device)
        if parallel_state.get_context_parallel_world_size() > 1
        else None
    )
    return document_attention_mask(document_ids, queries)


def _forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-token losses (last stage) or hidden states (other stages) of one micro-batch."""
    return model(batch["tokens"], batch["position_ids"], attention_mask(batch), labels=batch["labels"])


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits ``[b, s, v / tp]`` (last stage) or hidden states (other stages) of one micro-batch."""
    return model(batch["tokens"], batch["position_ids"], attention_mask(batch))


def _loss_share(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
    """This micro-batch's part of the global per-token mean."""
    return (per_token_loss.float() * loss_mask).sum() / global_tokens


def _schedule(
    model: ModelChunks, microbatches: list[dict], forward_step, layout: Layout, seq_len: int, forward_only: bool
) -> list[dict]:
    """megatron-core's pipeline schedule of ``forward_step`` over ``microbatches``; the last stage's loss
    functions' output dicts (empty elsewhere)."""
    chunks = list(model.chunks)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=layout.micro_batch,
        forward_only=forward_only,
    )


def _run_pipeline(
    model: ModelChunks,
    microbatches: list[dict],
    global_tokens: torch.Tensor,
    layout: Layout,
    seq_len: int,
    forward_only: bool,
    times: RankTimes = UNTIMED,
) -> torch.Tensor:
    """Forward (and backward) of all micro-batches through the pipeline; this rank's loss share on the last stage.

    The data-parallel gradient reduction averages over ranks (the expert-data-parallel ranks under expert
    parallelism), so the loss that is back-propagated is the share times their count; with
    ``calculate_per_token_loss`` the schedule applies no scaling of its own. With MoE layers the schedule
    takes the router losses' gradient weight from ``grad_scale_func``, which also scales the main loss:
    the loss function divides by it.
    """
    config = model.chunks[0].config
    moe_scale = _aux_loss_scale(layout) if config.num_moe_experts and not forward_only else None
    config.grad_scale_func = None if moe_scale is None else (lambda loss: loss * moe_scale)

    def loss_func(loss_mask, per_token_loss):
        share = _loss_share(per_token_loss, loss_mask, global_tokens)
        backward = share * layout.expert_dp if moe_scale is None else share * (layout.expert_dp / moe_scale)
        return backward, loss_mask.sum().int(), {"share": share.detach()}

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        with times.compute():
            output = _forward(chunk, batch)
        return output, functools.partial(loss_func, batch["loss_mask"])

    shares = _schedule(model, microbatches, forward_step, layout, seq_len, forward_only)
    if not shares:  # not the last stage
        return torch.zeros((), device=global_tokens.device)
    return torch.stack([item["share"] for item in shares]).sum()


def _global_loss(share: torch.Tensor, layout: Layout, holds_loss: bool) -> torch.Tensor:
    """Sum the shares over data-parallel ranks and hand the last stage's value to every rank, in one all-reduce."""
    loss = share.detach().float().clone() if holds_loss else torch.zeros_like(share, dtype=torch.float32)
    dist.all_reduce(loss)
    return loss / layout.tp


def _aux_loss_scale(layout: Layout) -> float:
    """Gradient weight of one micro-batch's router losses: their mean over the global batch's micro-batches.

    Dense gradients are summed over expert-parallel ranks and averaged over the expert-data-parallel ranks
    (dp x cp / ep), so cp / (micro-batches x ep) gives each of the dp x micro-batches router losses the weight
    1 / their count: under context parallelism each rank holds a part of a micro-batch's router losses that
    sums to the whole over the context-parallel ranks (megatron-core reduces them over its tp-cp group).
    """
    return layout.cp / (layout.num_microbatches * layout.ep)


def train_step(
    engine: Engine,
    model: ModelChunks,
    batches: Iterator[dict],
    layout: Layout,
    seq_len: int,
    device: torch.device,
    is_last_stage: bool,
    limits: UpdateLimits,
    moe_model=None,
    times: RankTimes = UNTIMED,
) -> StepResult:
    """Forward and backward over one global batch, then one optimizer update unless the loss or gradient norm
    is not finite or is above ``limits`` (``result.skipped`` says which happened).

    The host waits for nothing here: the global loss goes to the update as a device tensor, and the engine
    decides on the device, where the gradient norm is known. ``moe_model``: the ModelConfig of a
    mixture-of-experts model (its router losses are weighted and read). ``times``: where this rank's data
    wait and forward compute are added up (stragglers).
    """
    microbatches = _load(batches, layout, device, times)
    global_tokens = _global_tokens(microbatches, layout, is_last_stage)
    if moe_model is not None:
        clear_tracker()  # evaluation forwards may have recorded losses
        set_aux_loss_scale(_aux_loss_scale(layout), device)
    if layout.pp == 1:
        share = torch.zeros((), device=device)
        for batch in microbatches:
            with times.compute():
                per_token_loss = _forward(engine, batch)
            micro_share = _loss_share(per_token_loss, batch["loss_mask"], global_tokens)
            # The engine divides by the accumulation steps and averages over (expert-)data-parallel ranks;
            # undo both.
            engine.backward(micro_share * (layout.num_microbatches * layout.expert_dp))
            share += micro_share.detach()
    else:
        share = _run_pipeline(model, microbatches, global_tokens, layout, seq_len, forward_only=False, times=times)
        all_reduce_tied_embedding_grads(model)
    loss = _global_loss(share, layout, is_last_stage)
    update = engine.update(loss, limits)
    router_losses = None if moe_model is None else aux_losses(moe_model, layout, device)
    return StepResult(
        loss=loss,
        grad_norm=update.grad_norm,
        aux=None if moe_model is None else weighted_aux_loss(moe_model, router_losses),
        router_losses=router_losses,
        skipped=update.skipped,
    )


@torch.no_grad()
def eval_step(
    engine,
    model: ModelChunks,
    batches: Iterator[dict],
    layout: Layout,
    seq_len: int,
    device: torch.device,
    is_last_stage: bool,
) -> torch.Tensor:
    """Mean loss per token of one global batch, without updating anything."""
    microbatches = _load(batches, layout, device)
    global_tokens = _global_tokens(microbatches, layout, is_last_stage)
    if layout.pp == 1:
        share = sum(_loss_share(_forward(engine, batch), batch["loss_mask"], global_tokens) for batch in microbatches)
    else:
        share = _run_pipeline(model, microbatches, global_tokens, layout, seq_len, forward_only=True)
    return _global_loss(share, layout, is_last_stage)


def _log_likelihoods(logits: torch.Tensor, batch: dict, vocab_size: int) -> torch.Tensor:
    """Each sequence's summed log-probability of its unmasked labels, normalised over the tokenizer's
    ``vocab_size`` tokens only: the output layer's padding rows (``model.vocab_multiple``) are no tokens, and
    Hugging Face exports drop them. ``logits``: ``[b, s, v / tp]``, this tensor-parallel rank's vocabulary shard."""
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    padding = torch.arange(start, start + shard, device=logits.device) >= vocab_size
    logits = logits.float().masked_fill(padding, float("-inf"))
    per_token_loss = vocab_parallel_cross_entropy(logits, batch["labels"])
    return (per_token_loss * batch["loss_mask"]).sum(dim=1).neg()


@torch.no_grad()
def sequence_log_likelihoods(
    engine,
    model: ModelChunks,
    microbatches: list[dict],
    layout: Layout,
    seq_len: int,
    vocab_size: int,
    device: torch.device,
    is_last_stage: bool,
) -> Optional[torch.Tensor]:
    """Each sequence's summed log-probability of its unmasked labels (multiple-choice scoring), ``[n]`` on the
    last pipeline stage and None elsewhere; under context parallelism the sum over this rank's tokens (the
    caller adds the ranks' parts). Every micro-batch holds ``layout.micro_batch`` sequences."""
    microbatches = [_on_this_rank(batch, device) for batch in microbatches]
    if layout.pp == 1:
        return torch.cat([_log_likelihoods(_logits(engine, batch), batch, vocab_size) for batch in microbatches])
    sums = []

    def loss_func(batch, logits):
        sums.append(_log_likelihoods(logits, batch, vocab_size))
        return sums[-1].sum(), batch["loss_mask"].sum().int(), {}

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        return _logits(chunk, batch), functools.partial(loss_func, batch)

    _schedule(model, microbatches, forward_step, layout, seq_len, forward_only=True)
    return torch.cat(sums) if is_last_stage else None
