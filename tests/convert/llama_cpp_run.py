"""llama.cpp (through llama-cpp-python) as the tests run it: fp32 end to end, every position's logits."""

import math

import llama_cpp  # installed by .ci/run (built from PyPI's source distribution)
import numpy as np
import torch

F32 = 0  # GGML_TYPE_F32, for the KV cache


def load(path, n_ctx=512):
    """A GGUF model in llama.cpp with an f32 KV cache, logits for every position, one thread."""
    return llama_cpp.Llama(
        str(path), n_ctx=n_ctx, logits_all=True, type_k=F32, type_v=F32, n_threads=1, n_batch=n_ctx, verbose=False
    )


def load_vocab(path):
    """Only the tokenizer of a GGUF file."""
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def greedy(llm, ids, count: int) -> list[int]:
    """llama.cpp's own greedy continuation of ``ids`` (it does not stop at the end-of-document token)."""
    llm.reset()
    tokens = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        tokens.append(token)
        if len(tokens) == count:
            return tokens
    return tokens


def perplexity(llm, ids) -> float:
    scores = torch.from_numpy(logits(llm, ids))
    return math.exp(torch.nn.functional.cross_entropy(scores[:-1], torch.tensor(ids[1:])).item())
