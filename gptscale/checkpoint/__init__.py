"""Checkpoints that never lose a run: layout-independent, atomic, optionally asynchronous.

Model weights and Adam state are megatron-core ShardedTensors under global keys, written with its
torch_dist (PyTorch DCP) backend, so a checkpoint loads at any TP/PP/DP/ZeRO layout; components the trainer
registers (schedule, data, RNG, ...) are saved per rank. ``checkpointer.py`` is what the trainer uses,
``read.py`` reads and writes model weights in one process (conversion), ``cli.py`` is ``gptscale-ckpt``.
"""

from gptscale.checkpoint.manifest import CheckpointError

__all__ = ["CheckpointError"]
