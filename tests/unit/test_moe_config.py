"""MoE configuration: presets load, and layouts megatron-core or DeepSpeed cannot run are refused by field."""

import pytest

from gptscale.config import load_config
from gptscale.config.schema import is_moe_layer
from gptscale.config.validate import ConfigError, check


@pytest.mark.parametrize("preset", ["moe-tiny", "mixtral-8x7b", "qwen-moe-a2.7b"])
def test_presets_load_and_check(preset):
    cfg = load_config([f"model={preset}", "parallel.ep=2", "parallel.micro_batch=1", "parallel.global_batch=8"])
    assert cfg.model.moe.num_experts > 0 and check(cfg, 2).expert_dp == 1


@pytest.mark.parametrize(
    "overrides, world, fields",
    [
        (["parallel.ep=3"], 3, ["model.moe.num_experts=8", "parallel.ep=3"]),
        (["model.moe.top_k=9"], 1, ["model.moe.top_k=9"]),
        (["parallel.ep=2"], 1, ["parallel.ep=2 does not divide"]),
        (["parallel.tp=2"], 2, ["parallel.sp=true"]),
        (["parallel.ep=2", "parallel.zero=3"], 2, ["parallel.zero=3"]),
        (["model.moe.shared_expert_gate=true"], 1, ["model.moe.shared_expert_gate"]),
        (["model.moe.expert_bias=true", "model.moe.pre_softmax=true"], 1, ["model.moe.pre_softmax"]),
        (["model.moe.capacity_factor=0"], 1, ["model.moe.capacity_factor"]),
    ],
)
def test_refusals_name_the_fields(overrides, world, fields):
    cfg = load_config(["model=moe-tiny", "parallel.micro_batch=1", *overrides])
    with pytest.raises(ConfigError) as error:
        check(cfg, world)
    for field in fields:
        assert field in str(error.value)


def test_expert_parallel_needs_experts():
    with pytest.raises(ConfigError, match="parallel.ep=2 needs a mixture-of-experts model"):
        check(load_config(["parallel.ep=2"]), 2)


def test_layer_freq_mixes_dense_and_moe_layers():
    model = load_config(["model=moe-tiny", "model.moe.layer_freq=2"]).model
    assert [is_moe_layer(model, i) for i in range(4)] == [True, False, True, False]


def test_flops_count_only_active_experts():
    from gptscale.model.flops import matmul_parameters

    model = load_config(["model=mixtral-8x7b"]).model
    active = matmul_parameters(model, 32000)
    assert 12.5e9 < active < 12.9e9, active  # of 46.7B: 2 of 8 experts per token
    dense = load_config(["model=llama-7b"]).model
    assert matmul_parameters(dense, 32000) > 6.4e9  # dense models unchanged: every weight is active
