"""Bytes a running engine actually holds: unique storages of weights, gradients and optimizer tensors."""

from __future__ import annotations

import torch

from gptscale.plan.states import StateBytes


def _tensors(obj, found: list, seen: set, depth: int = 0) -> None:
    """Tensors reachable from a DeepSpeed/torch/gptscale optimizer object (its lists, dicts and attributes)."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found.append(obj)
        if obj.grad is not None:
            found.append(obj.grad)
        return
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim", "gptscale.optim")) and hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        _tensors(child, found, seen, depth + 1)


def _storages(tensors, exclude: set) -> dict[int, int]:
    sizes = {}
    for tensor in tensors:
        if tensor.device.type == "meta" or tensor.numel() <= 1:  # flags and norms, not model states
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            sizes[storage.data_ptr()] = storage.nbytes()
    return sizes


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the base optimizer's per-parameter state (moments and step counts)."""
    base = getattr(optimizer, "optimizer", optimizer)
    return sum(
        t.untyped_storage().nbytes()
        for state in base.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def held_bytes(model: torch.nn.Module, optimizer, gradients_before_step: dict[int, int]) -> StateBytes:
    """Weights the model holds, gradients (as recorded by ``gradient_storages`` before the update) and the
    optimizer's masters and moments."""
    weights = _storages(model.parameters(), set())
    found: list = []
    _tensors(optimizer, found, set())
    state = {
        t.untyped_storage().data_ptr()
        for s in getattr(optimizer, "optimizer", optimizer).state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    }
    others = _storages(found, set(weights) | set(gradients_before_step) | state)
    return StateBytes(
        sum(weights.values()),
        sum(gradients_before_step.values()),
        sum(others.values()) + optimizer_state_bytes(optimizer),
    )


def gradient_storages(model: torch.nn.Module, optimizer) -> dict[int, int]:
    """Storages holding gradients just before the update: ``.grad`` of weights and the optimizer's gradient
    buffers (names that say gradient), unique by storage."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for name, value in vars(optimizer).items():
        if "grad" in name:
            _tensors(value, grads, set())
    weights = _storages(model.parameters(), set())
    return _storages(grads, set(weights))
