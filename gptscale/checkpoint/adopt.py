"""A run that starts from a checkpoint takes the checkpoint's model instead of making the user retype it.

Every checkpoint records the run's resolved configuration (config.yaml), model included. The model is
adopted with ``model=from_checkpoint``, or when the run starts from a checkpoint path (``task.init``, else
``checkpoint.resume=PATH``) and the command line chooses no ``model=`` preset. ``model.*`` overrides may
change what the weights do not depend on (backend, attention kernel, dropout, RoPE scaling and, under RoPE,
the context length); one that contradicts the checkpoint is a ConfigError naming the field, before any
process does work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from gptscale.checkpoint.files import CONFIG, read_config
from gptscale.checkpoint.publish import resolve
from gptscale.config.schema import Config, ModelConfig, PositionEmbedding
from gptscale.config.validate import ConfigError

FROM_CHECKPOINT = "from_checkpoint"
RUNTIME_FIELDS = ("name", "backend", "attention", "hidden_dropout", "attention_dropout", "rope_scaling")
# Under RoPE no weight depends on the context length either: a run continues a checkpoint at a longer one.
ROPE_FIELDS = ("max_position_embeddings",)


def source_checkpoint(cfg: Config) -> Optional[str]:
    """The checkpoint path a run starts from: ``task.init``, else an explicit ``checkpoint.resume``."""
    if cfg.task.init:
        return cfg.task.init
    return cfg.checkpoint.resume if cfg.checkpoint.resume not in ("auto", "none") else None


def _override_fields(overrides: list[str]) -> list[str]:
    """Model fields a command line sets (``model.norm_eps=1e-6`` -> ``norm_eps``)."""
    keys = [override.lstrip("+~").split("=", 1)[0] for override in overrides]
    return [key.split(".")[1] for key in keys if key.startswith("model.")]


def adopt_model(cfg: Config, overrides: Optional[list[str]] = None) -> Config:
    """``cfg`` with the model of the checkpoint it starts from, where it asks for that (see the module).

    ``overrides``: the command line's, when known; without them only ``model=from_checkpoint`` adopts, and
    every model field that differs from the schema's default counts as given by the user.
    """
    asked = cfg.model.name == FROM_CHECKPOINT
    chose_preset = overrides is None or any(o.lstrip("+~").split("=", 1)[0] == "model" for o in overrides)
    source = source_checkpoint(cfg)
    if not asked and (chose_preset or source is None):
        return cfg
    if source is None:
        raise ConfigError(
            "model=from_checkpoint needs a checkpoint to take the model from: set task.init=PATH "
            "or checkpoint.resume=PATH"
        )
    root = resolve(source, Path(source))
    if root is None or not (root / CONFIG).is_file():
        raise ConfigError(f"model=from_checkpoint: {source} holds no checkpoint with a {CONFIG} to take the model from")
    saved = read_config(root).model
    if overrides is not None:
        given = _override_fields(overrides)
    else:
        default = ModelConfig()
        given = [
            f.name for f in dataclasses.fields(ModelConfig) if getattr(cfg.model, f.name) != getattr(default, f.name)
        ]
    free = RUNTIME_FIELDS + (ROPE_FIELDS if saved.position_embedding == PositionEmbedding.rope else ())
    conflicts = [
        f"model.{name}={_text(getattr(cfg.model, name))} contradicts the checkpoint's "
        f"{_text(getattr(saved, name))} ({root / CONFIG})"
        for name in given
        if name not in free and getattr(cfg.model, name) != getattr(saved, name)
    ]
    if conflicts:
        raise ConfigError(
            "the model is the checkpoint's (model=from_checkpoint); only "
            f"{', '.join('model.' + n for n in free[1:])} may differ:\n  - " + "\n  - ".join(conflicts)
        )
    runtime = {name: getattr(cfg.model, name) for name in given if name in free and name != "name"}
    return dataclasses.replace(cfg, model=dataclasses.replace(saved, **runtime))


def _text(value) -> str:
    return str(getattr(value, "value", value))
