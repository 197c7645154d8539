"""Checkpoint conversion to inference formats (Hugging Face transformers, GGUF) and back, and text generation.

Every converter works on one representation: a ``Config`` and a dict of full fp32 tensors keyed by
megatron-core's global sharded-state-dict names (what ``gptscale.checkpoint.read.load_model_state`` returns
and ``gptscale.convert.state.model_state`` builds from an in-memory model).
"""

from gptscale.errors import GptscaleError


class ConversionError(GptscaleError, ValueError):
    """An input the converters cannot handle; the message says what and why."""
