"""Checkpoint conversion to inference formats (Hugging Face transformers, GGUF) and back, and text generation.

Every converter works on one representation: a ``Config`` and a dict of full fp32 tensors keyed by
megatron-core's global sharded-state-dict names (what ``gptscale.checkpoint.read.load_model_state`` returns
and ``gptscale.convert.state.model_state`` builds from an in-memory model).
"""

from gptscale.errors import GptscaleError


class ConversionError(GptscaleError, ValueError):
    """An input the converters cannot handle; the message says what and why."""


# GGUF weight types. The K-quants are made by llama.cpp's own quantizer (llama-cpp-python) from an f32
# export: gguf-py has no K-quant encoder, and llama.cpp's choice of a type per tensor (the _M mixes) is the
# one users expect.
K_QUANTS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", *K_QUANTS)
