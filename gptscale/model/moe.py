"""What gptscale adds around megatron-core's MoE layers: router settings, load counts, loss scale, expert bias.

megatron-core builds the router, token dispatcher and experts; this module reads and steers them from
outside, so the training step and the trainer need not know megatron-core's internals.
"""

from __future__ import annotations

from megatron.core.transformer.moe import moe_utils


def provide_missing_te_gemm() -> None:
    """megatron-core 0.16's router GEMM tests ``te_general_gemm`` but only defines it when Transformer Engine
    imports; without it the name is missing, so it is defined as absent (torch's matmul is used)."""
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
