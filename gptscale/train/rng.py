"""Every random number generator a rank uses, as one state dict (so a resumed run draws the same numbers)."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel


class RngState:
    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        """Tensors and plain types only (NumPy's key array as a tensor), so checkpoints load with ``weights_only``."""
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": [
                name,
                torch.from_numpy(keys.astype(np.int64)),
                int(position),
                int(has_gauss),
                float(cached_gaussian),
            ],
            "torch": torch.get_rng_state(),
            "megatron": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        name, keys, position, has_gauss, cached_gaussian = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        torch.set_rng_state(state["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
