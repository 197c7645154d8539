"""Tiny tokenizers, tiny models with trained-looking weights, and megatron-core's own logits, for the tests."""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path
from typing import Mapping

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptscale.config import Config, load_config
from gptscale.config.schema import ParallelConfig, Precision, Recompute
from gptscale.config.validate import check, padded_vocab_size
from gptscale.convert import ConversionError
from gptscale.convert.state import _global_index, model_state
from gptscale.model.build import ModelChunks, build_model
from gptscale.model.init import initialize, sharded_tensors
from gptscale.model.spec import resolve_backend
from gptscale.parallel.groups import init_parallel

EOD = "<|endoftext|>"


@torch.no_grad()
def load_state(model: ModelChunks, state: Mapping[str, torch.Tensor]) -> None:
    """Copy full tensors into a one-rank ``model`` (the inverse of ``model_state``)."""
    shards = sharded_tensors(model)
    missing = sorted({shard.key for shard in shards} - set(state))
    unexpected = sorted(set(state) - {shard.key for shard in shards})
    if missing or unexpected:
        raise ConversionError(f"tensors do not fit the model: missing {missing}, unexpected {unexpected}")
    for shard in shards:
        shard.data.copy_(state[shard.key][_global_index(shard)])


def one_rank_config(cfg: Config) -> Config:
    """``cfg`` laid out on one rank in fp32: the layout the converters build models in."""
    train = dataclasses.replace(cfg.train, precision=Precision.fp32, activation_checkpointing=Recompute.none)
    return dataclasses.replace(cfg, parallel=ParallelConfig(), train=train)


def build_one_rank_model(cfg: Config, vocab_rows: int, device: torch.device) -> ModelChunks:
    """megatron-core's GPTModel of ``cfg`` on this process alone (sets up a one-rank process group)."""
    cfg = one_rank_config(cfg)
    layout = check(cfg, 1)
    context = init_parallel(layout, device, cfg.train.seed)
    return build_model(
        cfg.model, cfg.parallel, cfg.train, vocab_rows, resolve_backend(cfg.model, context.on_gpu), device
    )


def stdlib_text(names: list[str]) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((root / name).read_text(encoding="utf-8") for name in names)


TRAIN_FILES = ["argparse.py", "textwrap.py", "dataclasses.py", "functools.py"]
HELD_OUT_FILES = ["shlex.py"]


def train_tokenizer(path: Path, vocab: int = 400) -> Path:
    """A byte-level BPE like the datasets': GPT-2's pre-tokenizer, one special end-of-document token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([stdlib_text(TRAIN_FILES)], trainer)
    tokenizer.save(str(path))
    return path


def tiny_config(model: str, *overrides: str) -> Config:
    return load_config([f"model={model}", "train.seq_len=64", "model.vocab_multiple=128", *overrides])


def scaled_config(scaling: str) -> Config:
    """llama-tiny as if trained at 32 tokens, its RoPE stretched 4x by ``scaling`` (llama3 | yarn): every
    llama3 band and the YaRN ramp are in use."""
    return tiny_config(
        "llama-tiny",
        f"model.rope_scaling.type={scaling}",
        "model.rope_scaling.factor=4",
        "model.rope_scaling.original_max_position_embeddings=32",
        "model.max_position_embeddings=128",
    )


def perturbed_state(cfg: Config, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Initialised weights plus noise on every tensor, biases and norms included (so tying, bias and norm
    mistakes change the logits)."""
    model = build_one_rank_model(cfg, padded_vocab_size(vocab_size, cfg.model.vocab_multiple), torch.device("cpu"))
    initialize(model, cfg.train.seed, cfg.model.init_std, cfg.model.num_layers)
    state = model_state(model)
    generator = torch.Generator().manual_seed(seed)
    for key, tensor in state.items():
        scale = 0.1 if key.endswith(("bias", "layer_norm_weight", "norm.weight")) else 0.02
        tensor += scale * torch.randn(tensor.shape, generator=generator)
    return state


@torch.no_grad()
def megatron_logits(cfg: Config, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """gptscale's own model (megatron-core's GPTModel at one rank) on ``tokens`` [batch, seq]: [batch, seq, rows]."""
    rows = state["embedding.word_embeddings.weight"].shape[0]
    model = build_one_rank_model(cfg, rows, torch.device("cpu"))
    load_state(model, state)
    model.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, None).float()


def train_state(
    cfg: Config, tokenizer_file: Path, steps: int = 400, seq_len: int = 64, batch: int = 8, seed: int = 0
) -> dict[str, torch.Tensor]:
    """gptscale's model trained briefly on text encoded by ``tokenizer_file`` (so perplexity and greedy
    continuations mean something)."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ids = torch.tensor(tokenizer.encode(stdlib_text(TRAIN_FILES)).ids)
    vocab = tokenizer.get_vocab_size()
    model = build_one_rank_model(cfg, padded_vocab_size(vocab, cfg.model.vocab_multiple), torch.device("cpu"))
    initialize(model, cfg.train.seed, cfg.model.init_std, cfg.model.num_layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(seq_len).expand(batch, -1)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)
        windows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
        loss = model(windows[:, :-1], positions, None, labels=windows[:, 1:]).float().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model_state(model)
