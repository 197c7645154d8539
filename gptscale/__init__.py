"""gptscale: tensor-, pipeline- and data-parallel GPT pretraining on megatron-core and DeepSpeed."""

import warnings

# megatron-core announces every optional fused-kernel package it does not find; gptscale chooses its own
# kernels (gptscale.model.spec), so these notices say nothing to its users.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|apex).* (is|are) not installed")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated")

__version__ = "0.1.0"
