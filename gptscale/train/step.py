"""One optimizer step, top to bottom.

Without pipelining the DeepSpeed engine runs the loop DeepSpeed is built for: forward, ``engine.backward``
and ``engine.step`` per micro-batch, reducing gradients over data-parallel ranks (and partitioning them
under ZeRO-2/3) and updating at the accumulation boundary. With pipelining megatron-core's schedule
(1F1B, or interleaved 1F1B with virtual stages) runs every micro-batch's forward and backward across
stages; then the tied embedding's gradients are summed over the first and last stage, and the engine
reduces over data-parallel ranks, clips and updates once. This is how DeepSpeed's own pipeline engine
composes with ZeRO, and why ZeRO-2/3 (which reduce inside backward) are refused with pipelining.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from gptscale.config.validate import Layout
from gptscale.model.build import ModelChunks
from gptscale.parallel.deepspeed import reduce_gradients_outside_engine
from gptscale.parallel.grads import all_reduce_tied_embedding_grads


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss over the global batch, the same on every rank
    grad_norm: Optional[torch.Tensor]  # before clipping


def _to_device(batch: dict, device: torch.device) -> dict:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def _forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-token losses (last stage) or hidden states (other stages) of one micro-batch."""
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])


def _masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def _pipeline_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """megatron-core's loss contract: (summed loss, token count, value to report); it divides by both."""
    total = (per_token_loss.float() * loss_mask).sum()
    tokens = loss_mask.sum().clamp(min=1)
    return total, tokens.int(), {"loss": (total / tokens).detach()}


def _run_pipeline(model: ModelChunks, microbatches: list[dict], layout: Layout, seq_len: int,
                  forward_only: bool) -> torch.Tensor:
    """Forward (and backward) of all micro-batches through the pipeline; the mean loss on the last stage."""

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        return _forward(chunk, batch), functools.partial(_pipeline_loss, batch["loss_mask"])

    chunks = list(model.chunks)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=layout.micro_batch,
        forward_only=forward_only,
    )
    if not losses:  # not the last stage
        return torch.zeros((), device=microbatches[0]["tokens"].device)
    return torch.stack([item["loss"] for item in losses]).mean()


def _global_mean(local_loss: torch.Tensor, layout: Layout, holds_loss: bool) -> torch.Tensor:
    """Average over data-parallel ranks and hand the last stage's value to every rank, in one all-reduce."""
    loss = local_loss.detach().float().clone() if holds_loss else torch.zeros_like(local_loss, dtype=torch.float32)
    dist.all_reduce(loss)
    return loss / (layout.tp * layout.dp)


def train_step(engine, model: ModelChunks, batches: Iterator[dict], layout: Layout, seq_len: int,
               device: torch.device, is_last_stage: bool) -> StepResult:
    """Forward and backward over one global batch, then one optimizer update."""
    if layout.pp == 1:
        total = torch.zeros((), device=device)
        for _ in range(layout.num_microbatches):
            batch = _to_device(next(batches), device)
            loss = _masked_mean(_forward(engine, batch), batch["loss_mask"])
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        local_loss = total / layout.num_microbatches
    else:
        microbatches = [_to_device(next(batches), device) for _ in range(layout.num_microbatches)]
        local_loss = _run_pipeline(model, microbatches, layout, seq_len, forward_only=False)
        all_reduce_tied_embedding_grads(model)
        reduce_gradients_outside_engine(engine)
        engine.step()
    grad_norm = engine.get_global_grad_norm()
    return StepResult(
        loss=_global_mean(local_loss, layout, is_last_stage),
        grad_norm=None if grad_norm is None else torch.as_tensor(grad_norm, dtype=torch.float32),
    )


@torch.no_grad()
def eval_step(engine, model: ModelChunks, batches: Iterator[dict], layout: Layout, seq_len: int,
              device: torch.device, is_last_stage: bool) -> torch.Tensor:
    """Mean loss of one global batch without updating anything."""
    microbatches = [_to_device(next(batches), device) for _ in range(layout.num_microbatches)]
    if layout.pp == 1:
        losses = [_masked_mean(_forward(engine, batch), batch["loss_mask"]) for batch in microbatches]
        local_loss = torch.stack(losses).mean()
    else:
        local_loss = _run_pipeline(model, microbatches, layout, seq_len, forward_only=True)
    return _global_mean(local_loss, layout, is_last_stage)
