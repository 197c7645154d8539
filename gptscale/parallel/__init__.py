"""Process groups, the CPU backend, and the DeepSpeed engine over megatron-core's model.

Importing this package tells DeepSpeed up front which accelerator it is on, so it neither probes for one
nor warns about the probe.
"""

import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
