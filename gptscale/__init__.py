"""gptscale: tensor-, pipeline- and data-parallel GPT pretraining on megatron-core and DeepSpeed."""

import os
import warnings

# megatron-core announces every optional fused-kernel package it does not find; gptscale chooses its own
# kernels (gptscale.model.spec), so these notices say nothing to its users.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|apex).* (is|are) not installed")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated")
# torch's deprecations inside megatron-core's checkpoint loading (ShardedTensor, DCP's load_state_dict), shown
# on every resume and evaluation by every rank: about megatron-core's code, not the user's run.
warnings.filterwarnings("ignore", message=r".*Please use DTensor instead and we are deprecating ShardedTensor")
warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated")


def _name_the_cpu_accelerator() -> None:
    """Without a GPU, DeepSpeed warns "Setting accelerator to CPU" in every process that imports it, and
    megatron-core asks for CUDA_DEVICE_MAX_CONNECTIONS: naming both up front selects the same quietly."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # megatron-core's CUDA-stream advice, moot here


_name_the_cpu_accelerator()

__version__ = "0.1.0"
