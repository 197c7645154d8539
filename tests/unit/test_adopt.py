"""A run starting from a checkpoint adopts the checkpoint's model; contradicting it is an error naming the field."""

import pytest
import torch

from gptscale.checkpoint.adopt import adopt_model
from gptscale.checkpoint.read import save_model_state
from gptscale.config import ConfigError, load_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config(["model=llama-tiny", "model.norm_eps=1e-4"])
    return cfg.model, save_model_state(tmp_path_factory.mktemp("ckpt") / "saved", cfg, {"weight": torch.zeros(2)})


def test_from_checkpoint_takes_the_saved_model(checkpoint):
    saved, path = checkpoint
    cfg = adopt_model(load_config(["model=from_checkpoint", f"task.init={path}"]))
    assert cfg.model == saved and cfg.model.norm_eps == 1e-4


def test_resume_path_without_a_preset_adopts_and_keeps_runtime_fields(checkpoint):
    saved, path = checkpoint
    overrides = [f"checkpoint.resume={path}", "model.attention_dropout=0.25"]
    cfg = adopt_model(load_config(overrides), overrides)
    assert cfg.model.num_layers == saved.num_layers and cfg.model.norm_eps == saved.norm_eps
    assert cfg.model.attention_dropout == 0.25


def test_a_preset_on_the_command_line_is_kept(checkpoint):
    _, path = checkpoint
    overrides = ["model=gpt2-tiny", f"checkpoint.resume={path}"]
    assert adopt_model(load_config(overrides), overrides).model.name == "gpt2-tiny"


def test_contradicting_override_names_the_field(checkpoint):
    _, path = checkpoint
    overrides = ["model=from_checkpoint", f"task.init={path}", "model.norm_eps=1e-6"]
    with pytest.raises(ConfigError, match=r"model\.norm_eps=1e-06 contradicts the checkpoint's 0\.0001"):
        adopt_model(load_config(overrides), overrides)


def test_from_checkpoint_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="task.init=PATH or checkpoint.resume=PATH"):
        adopt_model(load_config(["model=from_checkpoint"]))
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        adopt_model(load_config(["model=from_checkpoint", f"task.init={tmp_path}"]))


def test_a_rope_checkpoint_continues_at_a_longer_context_with_scaling(checkpoint):
    saved, path = checkpoint
    overrides = [
        f"task.init={path}",
        "model.max_position_embeddings=8192",
        "model.rope_scaling.type=yarn",
        "model.rope_scaling.factor=4",
        f"model.rope_scaling.original_max_position_embeddings={2048}",
    ]
    model = adopt_model(load_config(overrides), overrides).model
    assert model.norm_eps == saved.norm_eps and model.max_position_embeddings == 8192
    assert model.rope_scaling.type.value == "yarn" and model.rope_scaling.original_max_position_embeddings == 2048


def test_learned_positions_keep_their_context(tmp_path):
    path = save_model_state(tmp_path / "gpt2", load_config(["model=gpt2-tiny"]), {"weight": torch.zeros(2)})
    overrides = [f"task.init={path}", "model.max_position_embeddings=2048"]
    with pytest.raises(ConfigError, match=r"model\.max_position_embeddings=2048 contradicts the checkpoint's 1024"):
        adopt_model(load_config(overrides), overrides)
