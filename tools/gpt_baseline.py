"""A plain PyTorch GPT on gptscale's model presets: the speed gptscale's stack is measured against.

    python tools/gpt_baseline.py model=gpt2-350m --seq-len 1024 --micro-batch 16
    python tools/gpt_baseline.py model=llama-tiny --seq-len 64 --micro-batch 2 --no-compile   # on CPU

No megatron-core, no DeepSpeed: one module per block, SDPA flash attention, torch.compile of each block (the
layers share one compiled graph, so compiling takes seconds, not minutes), fused AdamW, bf16 autocast over fp32
weights, random tokens. Tokens/s and MFU use gptscale's accounting (``flops_per_token``: 6N + 12LHQT, no causal
halving; ``device_peak_tflops``), so a row here and a ``gptscale-bench`` row of the same preset, taken on one
device, divide into a fair ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptscale.config import load_config  # noqa: E402
from gptscale.config.schema import ModelConfig, Precision  # noqa: E402
from gptscale.config.validate import padded_vocab_size  # noqa: E402
from gptscale.model.flops import flops_per_token  # noqa: E402
from gptscale.parallel.devices import device_peak_tflops  # noqa: E402


def norm(model: ModelConfig) -> nn.Module:
    if model.normalization.value == "RMSNorm":
        return nn.RMSNorm(model.hidden_size, eps=model.norm_eps)
    return nn.LayerNorm(model.hidden_size, eps=model.norm_eps, bias=model.bias)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, heads, T, D] with halves rotated (Llama's layout)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, model: ModelConfig):
        super().__init__()
        h, self.heads, self.groups = model.hidden_size, model.num_attention_heads, model.query_groups
        self.head_dim = h // self.heads
        self.norm1, self.norm2 = norm(model), norm(model)
        self.qkv = nn.Linear(h, (self.heads + 2 * self.groups) * self.head_dim, bias=model.bias)
        self.proj = nn.Linear(h, h, bias=model.bias)
        self.swiglu = model.activation.value == "swiglu"
        self.fc1 = nn.Linear(h, model.ffn_size * (2 if self.swiglu else 1), bias=model.bias)
        self.fc2 = nn.Linear(model.ffn_size, h, bias=model.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(b, t, -1, self.head_dim)
            .transpose(1, 2)
            .split([self.heads, self.groups, self.groups], dim=1)
        )
        if rope is not None:
            q, k = rotary(q, *rope), rotary(k, *rope)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.groups != self.heads)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, -1))
        hidden = self.fc1(self.norm2(x))
        if self.swiglu:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden, approximate="tanh")
        return x + self.fc2(hidden)


class GPT(nn.Module):
    def __init__(self, model: ModelConfig, vocab: int, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, model.hidden_size)
        self.rope = model.position_embedding.value == "rope"
        if self.rope:
            head_dim = model.hidden_size // model.num_attention_heads
            inv_freq = model.rotary_base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
            angles = torch.outer(torch.arange(seq_len).float(), inv_freq).repeat(1, 2)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)
        else:
            self.positions = nn.Embedding(seq_len, model.hidden_size)
        self.blocks = nn.ModuleList(Block(model) for _ in range(model.num_layers))
        self.norm = norm(model)
        self.head = nn.Linear(model.hidden_size, vocab, bias=False)
        if model.tie_embeddings:
            self.head.weight = self.embed.weight
        for name, param in self.named_parameters():
            if param.dim() == 2:  # output projections scaled by depth, as GPT-2 and gptscale do
                std = (
                    model.init_std / math.sqrt(2 * model.num_layers)
                    if name.endswith(("proj.weight", "fc2.weight"))
                    else model.init_std
                )
                nn.init.normal_(param, std=std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        rope = (self.cos, self.sin) if self.rope else None
        if not self.rope:
            x = x + self.positions(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x, rope)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="gptscale overrides that choose the shape (model=gpt2-350m)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--output", help="append one JSON line of the figures to this file")
    args = parser.parse_args()

    model_cfg = load_config(args.overrides).model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vocab = padded_vocab_size(model_cfg.vocab_size, model_cfg.vocab_multiple)
    model = GPT(model_cfg, vocab, args.seq_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=device.type == "cuda")
    if args.compile:
        for block in model.blocks:
            block.compile()
    tokens = torch.randint(0, model_cfg.vocab_size, (args.micro_batch, args.seq_len + 1), device=device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [step() for _ in range(args.warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_time = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.micro_batch * args.seq_len / step_time
    tflops = tokens_per_s * flops_per_token(model_cfg, vocab, args.seq_len) / 1e12
    peak = device_peak_tflops(device, Precision.bf16)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    record = {
        "date": str(datetime.date.today()),
        "label": f"baseline {model_cfg.name}",
        "model": model_cfg.name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "compile": args.compile,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": tflops,
        "mfu": tflops / peak if peak else None,
        "step_time_s": step_time,
        "peak_memory_gib": memory,
        "losses": [loss.item() for loss in losses],
    }
    mfu = "n/a" if peak is None else f"{tflops / peak:.1%}"
    print(
        f"baseline {model_cfg.name}: {tokens_per_s:,.0f} tokens/s, {tflops:.2f} TFLOP/s, MFU {mfu}, "
        f"step {step_time * 1e3:.1f} ms, peak {memory or 0:.2f} GiB, loss {losses[-1].item():.3f}",
        flush=True,
    )
    if args.output:
        with open(args.output, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
