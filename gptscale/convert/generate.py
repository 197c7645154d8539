"""Text generation from gathered weights: gptscale's forward pass in plain torch with a KV cache.

Why not megatron-core's inference path? It needs megatron's process groups even at one rank, is built
around its CUDA inference engines, and gptscale's SDPA core attention relies on ``is_causal``, which torch
aligns top-left: a one-token query against cached keys would see only the first of them. This decoder
computes the same function as megatron-core's GPTModel (tests hold it to megatron-core's logits) from the
converters' representation, on any device, in one process: the fused QKV is read per query group, RoPE
rotates halves (megatron-core's non-interleaved convention), GELU is exact, the padded vocabulary is cut
to the tokenizer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from gptscale.config.schema import Activation, ModelConfig, Normalization, PositionEmbedding
from gptscale.model.rope import attention_factor, frequencies

LAYER = "decoder.layers."


@dataclass
class Sampling:
    """Greedy (``temperature == 0``) or sampling with temperature, then top-k, then top-p (HF's order)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0


class KVCache:
    """Keys and values of every layer for the tokens seen so far: [batch, groups, tokens, head_dim]."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Decoder:
    """gptscale's GPT over the converters' representation (global tensors, layers stacked)."""

    def __init__(
        self,
        model: ModelConfig,
        state: Mapping[str, torch.Tensor],
        vocab_size: int,
        device: torch.device = torch.device("cpu"),
        dtype: torch.dtype = torch.float32,
    ):
        self.model = model
        self.vocab_size = vocab_size
        self.w = {key: tensor.to(device=device, dtype=dtype) for key, tensor in state.items()}
        self.device, self.dtype = device, dtype
        self.heads = model.num_attention_heads
        self.groups = model.query_groups
        self.head_dim = model.hidden_size // self.heads
        self.output = self.w["embedding.word_embeddings.weight" if model.tie_embeddings else "output_layer.weight"]
        if model.position_embedding == PositionEmbedding.rope:
            self.inv_freq = frequencies(model).to(device)
            self.rope_factor = attention_factor(model.rope_scaling)

    def layer(self, name: str, index: int) -> Optional[torch.Tensor]:
        """Layer ``index``'s tensor, stacked (dense models) or keyed by layer (MoE models)."""
        tensor = self.w.get(LAYER + name)
        return self.w.get(f"{LAYER}{index}.{name}") if tensor is None else tensor[index]

    def norm(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.model.normalization == Normalization.RMSNorm:
            return F.rms_norm(x, (x.shape[-1],), weight, self.model.norm_eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.model.norm_eps)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate halves of each head ([b, heads, t, d]) by position, megatron-core's non-interleaved RoPE
        (frequencies and YaRN's temperature as ``model.rope_scaling`` sets them)."""
        angles = torch.outer(positions.float(), self.inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = (angles.cos() * self.rope_factor).to(x.dtype), (angles.sin() * self.rope_factor).to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    def attention(self, index: int, h: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        """Self-attention of the new tokens (at ``positions``) over the cached ones and themselves."""
        batch, tokens, _ = h.shape
        qkv = F.linear(
            h,
            self.layer("self_attention.linear_qkv.weight", index),
            self.layer("self_attention.linear_qkv.bias", index),
        )
        per_group = self.heads // self.groups
        qkv = qkv.view(batch, tokens, self.groups, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k, v = qkv[:, :, :, per_group].transpose(1, 2), qkv[:, :, :, per_group + 1].transpose(1, 2)
        if self.model.position_embedding == PositionEmbedding.rope:
            q, k = self.rope(q, positions), self.rope(k, positions)
        k, v = cache.append(index, k, v)
        visible = torch.arange(k.shape[2], device=h.device)[None, :] <= positions[:, None]
        if per_group > 1:  # each key/value head serves the consecutive query heads of its group
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        out = out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        return F.linear(
            out,
            self.layer("self_attention.linear_proj.weight", index),
            self.layer("self_attention.linear_proj.bias", index),
        )

    def experts(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """A MoE layer as megatron-core's router computes it: softmax then top-k (``pre_softmax``), top-k then
        softmax, or sigmoid scores chosen with the expert bias and renormalised; plus the shared expert."""
        moe = self.model.moe
        logits = F.linear(h, self.layer("mlp.router.weight", index))
        if moe.expert_bias:
            scores = torch.sigmoid(logits)
            chosen = torch.topk(scores + self.layer("mlp.router.expert_bias", index), moe.top_k, dim=-1).indices
            weights = scores.gather(-1, chosen)
            if moe.top_k > 1:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        elif moe.pre_softmax:
            weights, chosen = torch.topk(logits.softmax(-1), moe.top_k, dim=-1)
        else:
            weights, chosen = torch.topk(logits, moe.top_k, dim=-1)
            weights = weights.softmax(-1)
        fc1, fc2 = (
            self.layer("mlp.experts.experts.linear_fc1.weight", index),
            self.layer("mlp.experts.experts.linear_fc2.weight", index),
        )
        out = torch.zeros_like(h)
        for expert in chosen.unique().tolist():
            picked = chosen == expert  # [..., top_k], at most one True per token
            tokens = picked.any(-1)
            gate, up = F.linear(h[tokens], fc1[expert]).chunk(2, dim=-1)
            weight = (weights * picked).sum(-1)[tokens, None]
            out[tokens] += weight * F.linear(F.silu(gate) * up, fc2[expert])
        shared = self.layer("mlp.shared_experts.linear_fc1.weight", index)
        if shared is not None:
            gate, up = F.linear(h, shared).chunk(2, dim=-1)
            shared_out = F.linear(F.silu(gate) * up, self.layer("mlp.shared_experts.linear_fc2.weight", index))
            gate_weight = self.layer("mlp.shared_experts.gate_weight", index)
            out = out + (shared_out if gate_weight is None else torch.sigmoid(F.linear(h, gate_weight)) * shared_out)
        return out

    def mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        if self.layer("mlp.router.weight", index) is not None:
            return self.experts(index, h)
        h = F.linear(h, self.layer("mlp.linear_fc1.weight", index), self.layer("mlp.linear_fc1.bias", index))
        if self.model.activation == Activation.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return F.linear(h, self.layer("mlp.linear_fc2.weight", index), self.layer("mlp.linear_fc2.bias", index))

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [batch, new tokens, vocab] of ``tokens`` [batch, new tokens] following the cached ones."""
        tokens = tokens.to(self.device)
        positions = torch.arange(cache.length, cache.length + tokens.shape[1], device=self.device)
        x = F.embedding(tokens, self.w["embedding.word_embeddings.weight"])
        if self.model.position_embedding == PositionEmbedding.learned:
            x = x + F.embedding(positions, self.w["embedding.position_embeddings.weight"])
        for index in range(self.model.num_layers):
            h = self.norm(
                x,
                self.layer("self_attention.linear_qkv.layer_norm_weight", index),
                self.layer("self_attention.linear_qkv.layer_norm_bias", index),
            )
            x = x + self.attention(index, h, cache, positions)
            h = self.norm(
                x,
                self.layer("mlp.linear_fc1.layer_norm_weight", index),
                self.layer("mlp.linear_fc1.layer_norm_bias", index),
            )
            x = x + self.mlp(index, h)
        x = self.norm(x, self.w["decoder.final_layernorm.weight"], self.w.get("decoder.final_layernorm.bias"))
        return F.linear(x, self.output[: self.vocab_size]).float()

    @property
    def max_tokens(self) -> Optional[int]:
        """How many positions the model has (learned positions); None for RoPE."""
        table = self.w.get("embedding.position_embeddings.weight")
        return None if table is None else table.shape[0]

    def new_cache(self) -> KVCache:
        return KVCache(self.model.num_layers)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> int:
    """One token id from the last position's logits [vocab]."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(
    decoder: Decoder,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: Optional[int] = None,
    stop: Optional[int] = None,
) -> list[int]:
    """Token ids following ``prompt``: the prompt is read once, then one token per step from the cache."""
    if not prompt:
        raise ValueError("the prompt encodes to no tokens")
    limit = decoder.max_tokens
    if limit is not None and len(prompt) + max_new_tokens > limit:
        raise ValueError(
            f"{len(prompt)} prompt tokens + {max_new_tokens} new ones exceed the model's {limit} learned positions"
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = decoder.new_cache()
    logits = decoder.forward(torch.tensor([prompt]), cache)[0, -1]
    new: list[int] = []
    while len(new) < max_new_tokens:
        token = next_token(logits, sampling, generator)
        new.append(token)
        if token == stop:
            break
        logits = decoder.forward(torch.tensor([[token]]), cache)[0, -1]
    return new
