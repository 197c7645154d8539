"""FP8 settings: early checks that name the fields, and their mapping to megatron-core and torchao."""

import pytest
import torch

from gptscale.config import ConfigError, check, load_config
from gptscale.config.schema import Backend
from gptscale.model.build import transformer_config
from gptscale.model.fp8 import check_fp8, torchao_float8_config, transformer_engine_fp8

BF16_FP8 = ["train.precision=bf16", "train.fp8=hybrid"]
CPU = torch.device("cpu")


def train_config(overrides):
    return load_config(overrides).train


def test_fp8_needs_bf16():
    with pytest.raises(ConfigError, match=r"train.fp8=hybrid needs train.precision=bf16 \(not fp32\)"):
        check(load_config(["train.fp8=hybrid"]), world_size=1)


def test_emulation_needs_fp8():
    with pytest.raises(ConfigError, match="train.fp8_emulate=true needs train.fp8"):
        check(load_config(["train.fp8_emulate=true"]), world_size=1)


def test_unknown_format_names_the_key():
    with pytest.raises(Exception, match="train.fp8"):
        load_config(["train.fp8=e5m2"])


def test_fp8_on_cpu_without_emulation_says_what_hardware_it_needs():
    cfg = load_config(BF16_FP8)
    with pytest.raises(
        ConfigError,
        match=r"train.fp8=hybrid needs a GPU with FP8 tensor cores.*this device: cpu.*"
        r"train.fp8_emulate=true",
    ):
        check_fp8(cfg.model, cfg.train, Backend.local, CPU)


def test_fp8_with_transformer_engine_needs_a_hopper_gpu_and_has_no_emulation():
    cfg = load_config([*BF16_FP8, "model.backend=te"])
    with pytest.raises(ConfigError, match="needs a GPU with FP8 tensor cores"):
        check_fp8(cfg.model, cfg.train, Backend.te, CPU)
    cfg = load_config([*BF16_FP8, "model.backend=te", "train.fp8_emulate=true"])
    with pytest.raises(ConfigError, match="train.fp8_emulate=true.*model.backend=local"):
        check_fp8(cfg.model, cfg.train, Backend.te, CPU)


def test_delayed_scaling_is_transformer_engine_only():
    cfg = load_config([*BF16_FP8, "train.fp8_recipe=delayed", "train.fp8_emulate=true"])
    with pytest.raises(ConfigError, match="train.fp8_recipe=delayed needs Transformer Engine"):
        check_fp8(cfg.model, cfg.train, Backend.local, CPU)


def test_emulated_fp8_passes_on_cpu_and_no_fp8_always_passes():
    cfg = load_config([*BF16_FP8, "train.fp8_emulate=true"])
    check_fp8(cfg.model, cfg.train, Backend.local, CPU)
    cfg = load_config([])
    check_fp8(cfg.model, cfg.train, Backend.te, CPU)


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_transformer_engine_fields(fmt, recipe):
    train = train_config(["train.precision=bf16", f"train.fp8={fmt}", f"train.fp8_recipe={recipe}"])
    fields = transformer_engine_fp8(train)
    assert fields["fp8"] == fmt and fields["fp8_recipe"] == recipe
    if recipe == "delayed":
        assert fields["fp8_amax_history_len"] == 1024 and fields["fp8_amax_compute_algo"] == "max"
    cfg = load_config(["model=gpt2-tiny", "train.precision=bf16", f"train.fp8={fmt}", f"train.fp8_recipe={recipe}"])
    config = transformer_config(cfg.model, cfg.parallel, cfg.train, on_gpu=True, backend=Backend.te)
    assert (config.fp8, config.fp8_recipe) == (fmt, recipe)


def test_fp8_fields_reach_megatron_only_with_transformer_engine():
    cfg = load_config([*BF16_FP8, "train.fp8_emulate=true"])
    assert transformer_config(cfg.model, cfg.parallel, cfg.train, on_gpu=False, backend=Backend.local).fp8 is None
    assert transformer_engine_fp8(load_config([]).train) == {}


def test_torchao_recipes():
    hybrid = torchao_float8_config(train_config([*BF16_FP8, "train.fp8_emulate=true"]))
    assert hybrid.emulate
    assert hybrid.cast_config_input.target_dtype in (None, torch.float8_e4m3fn)  # None: torchao's e4m3 default
    assert hybrid.cast_config_grad_output.target_dtype in (None, torch.float8_e5m2)
    e4m3 = torchao_float8_config(train_config(["train.precision=bf16", "train.fp8=e4m3"]))
    assert not e4m3.emulate and e4m3.cast_config_grad_output.target_dtype == torch.float8_e4m3fn
    assert torchao_float8_config(train_config([])) is None
