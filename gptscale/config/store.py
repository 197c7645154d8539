"""Hydra wiring: the schema registered under the name conf/config.yaml starts from, and where conf/ lives."""

from __future__ import annotations

import dataclasses
import difflib
from importlib import resources
from pathlib import Path
from typing import cast

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gptscale.config.schema import Config
from gptscale.config.validate import ConfigError


def _config_dir() -> Path:
    """conf/ of a source checkout, or the copy installed as package data (gptscale.conf)."""
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    return Path(str(resources.files("gptscale.conf")))


CONFIG_DIR = _config_dir()


def register_schema() -> None:
    ConfigStore.instance().store(name="gptscale_schema", node=Config)


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys the schema does not know, each with the nearest known ones: a ``+key=value`` override adds a key
    even to a structured config, so a typo would otherwise be stored and ignored."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return []
    known = [field.name for field in dataclasses.fields(schema)]
    problems = []
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in known:
            near = [f"{prefix}{match}" for match in difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)]
            hint = f" (did you mean {' or '.join(near)}?)" if near else f" (known keys here: {', '.join(known)})"
            problems.append(f"{name}: unknown key{hint}")
        else:
            child = cfg._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                problems += unknown_keys(child, f"{name}.")
    return problems


def to_config(cfg: DictConfig) -> Config:
    """The typed Config of a composed Hydra config (enums and dataclasses, not DictConfig); a key the schema
    does not know is a ConfigError naming it."""
    problems = unknown_keys(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cast(Config, OmegaConf.to_object(cfg))


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose conf/ with Hydra-style overrides outside a Hydra app (tools, tests, benchmarks)."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return to_config(compose(config_name="config", overrides=list(overrides or [])))
