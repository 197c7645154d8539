"""megatron-core GPTModel built from gptscale's model config.

GPT-2 style (learned positions, LayerNorm, GELU, biases, tied embeddings) and Llama style (RoPE, RMSNorm,
SwiGLU, grouped-query attention, untied output) are the same GPTModel with different settings. A pipeline
rank builds one chunk per virtual stage; ``ModelChunks`` holds them as one module for DeepSpeed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer import TransformerConfig

from gptscale.config.schema import (
    Activation,
    Backend,
    ModelConfig,
    ParallelConfig,
    Precision,
    Recompute,
    TrainConfig,
    is_moe_layer,
)
from gptscale.config.validate import padded_vocab_size
from gptscale.model.fp8 import torchao_float8_config, transformer_engine_fp8
from gptscale.model.moe import provide_missing_te_gemm
from gptscale.model.rope import position_embedding_type, scale_llama3, set_yarn_fields
from gptscale.model.spec import decoder_block_spec


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, on_gpu: bool, backend: Backend = Backend.local
) -> TransformerConfig:
    """megatron-core's TransformerConfig for this model, layout and precision (CPU: no fused kernels).

    Transformer Engine's FP8 is switched on here; the local backend's FP8 lives in the layer spec.
    """
    dtype = torch.bfloat16 if train.precision == Precision.bf16 else torch.float32
    recompute = {
        Recompute.none: {},
        Recompute.selective: {"recompute_granularity": "selective"},
        Recompute.full: {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }[train.activation_checkpointing]
    swiglu = model.activation == Activation.swiglu
    config = TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.hidden_size // model.num_attention_heads,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        layernorm_epsilon=model.norm_eps,
        normalization=model.normalization.value,
        add_bias_linear=model.bias,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sp,
        context_parallel_size=parallel.cp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # megatron-core's own initialisation runs (it also tags tensor-parallel weights, which gradient-norm
        # code relies on); gptscale.model.init then overwrites the values so every layout starts alike.
        perform_initialization=True,
        use_cpu_initialization=False,
        # Fusions that need apex or CUDA JIT kernels; torch does the same work unfused.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        # gloo matches point-to-point messages by peer and posting order. With two pipeline ranks the
        # previous and next stage are the same peer, so batched sends in both directions can pair an
        # activation with a gradient; megatron-core's unbatched path orders them (even/odd ranks) instead.
        batch_p2p_comm=on_gpu,
        batch_p2p_sync=on_gpu,
        deallocate_pipeline_outputs=True,
        # gptscale.train.step weights every micro-batch's summed loss by the global batch's token count, so
        # the pipeline schedule must pass losses through instead of dividing by micro-batch and token counts.
        calculate_per_token_loss=True,
        add_qkv_bias=model.qkv_bias,
        expert_model_parallel_size=parallel.ep,
        **moe_fields(model),
        **recompute,
        **(transformer_engine_fp8(train) if backend == Backend.te else {}),
    )
    set_yarn_fields(config, model)
    return config


def moe_fields(model: ModelConfig) -> dict:
    """TransformerConfig's mixture-of-experts settings (none for a dense model).

    Experts are megatron-core's SequentialMLP (one MLP per local expert; no grouped GEMM kernel needed);
    the load-balancing loss is the aux loss (or none, with aux-loss-free expert biases).
    """
    moe = model.moe
    if moe.num_experts == 0:
        return {}
    return {
        "num_moe_experts": moe.num_experts,
        "moe_router_topk": moe.top_k,
        "moe_router_pre_softmax": moe.pre_softmax,
        "moe_ffn_hidden_size": model.expert_ffn_size,
        "moe_shared_expert_intermediate_size": moe.shared_expert_size or None,
        "moe_shared_expert_gate": moe.shared_expert_gate,
        "moe_layer_freq": [int(is_moe_layer(model, i)) for i in range(model.num_layers)],
        "moe_router_load_balancing_type": "aux_loss" if moe.aux_loss_coeff > 0 else "none",
        "moe_aux_loss_coeff": moe.aux_loss_coeff,
        "moe_z_loss_coeff": moe.z_loss_coeff or None,
        "moe_router_enable_expert_bias": moe.expert_bias,
        "moe_router_score_function": "sigmoid" if moe.expert_bias else "softmax",
        "moe_router_bias_update_rate": moe.expert_bias_update_rate,
        "moe_expert_capacity_factor": moe.capacity_factor,
        "moe_pad_expert_input_to_capacity": False,
        "moe_token_dispatcher_type": moe.dispatcher.value,
        "moe_grouped_gemm": False,
    }


class ModelChunks(torch.nn.Module):
    """The model chunks this rank holds (one per virtual pipeline stage); calling it runs the first chunk."""

    def __init__(self, chunks: list[GPTModel]):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, *args, **kwargs):
        return self.chunks[0](*args, **kwargs)


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    train: TrainConfig,
    vocab_size: int,
    backend: Backend,
    device: torch.device,
) -> ModelChunks:
    """Build this rank's share of the model (uninitialised: call ``gptscale.model.init.initialize``).

    On the meta device (``gptscale.plan``, inside ``with torch.device("meta")``) weights get shapes and
    dtypes but no storage and no initialisation, so a 70B model's shards are read in a fraction of a second.
    """
    config = transformer_config(model, parallel, train, on_gpu=device.type == "cuda", backend=backend)
    if device.type == "meta":
        config.use_cpu_initialization, config.perform_initialization = True, False
    if model.moe.num_experts:
        provide_missing_te_gemm()
    float8 = torchao_float8_config(train) if backend == Backend.local else None
    vpp = parallel.vpp
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(model, config, backend, vp_stage, float8),
            vocab_size=padded_vocab_size(vocab_size, model.vocab_multiple),
            max_sequence_length=max(model.max_position_embeddings, train.seq_len),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type=position_embedding_type(model),
            rotary_base=int(model.rotary_base),
            vp_stage=vp_stage,
        )
        scale_llama3(chunk, model)
        if train.compile:
            compile_layers(chunk)
        chunks.append(chunk.to(device))
    return ModelChunks(chunks)


def compile_layers(chunk: GPTModel) -> None:
    """torch.compile every transformer layer in place (torchtitan's granularity).

    Per layer rather than the whole model: one layer's graph is compiled once and reused by all layers,
    the pipeline schedule and recomputation still see plain modules, and collectives stay at layer edges
    or break the graph harmlessly. Whole-model compile measured slower on H100 (issue 7).
    """
    for layer in chunk.decoder.layers:
        layer.compile()
