"""Hydra wiring: the schema registered under the name conf/config.yaml starts from, and where conf/ lives."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gptscale.config.schema import Config


def _config_dir() -> Path:
    """conf/ of a source checkout, or the copy installed as package data (gptscale.conf)."""
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    return Path(str(resources.files("gptscale.conf")))


CONFIG_DIR = _config_dir()


def register_schema() -> None:
    ConfigStore.instance().store(name="gptscale_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """The typed Config of a composed Hydra config (enums and dataclasses, not DictConfig)."""
    return OmegaConf.to_object(cfg)


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose conf/ with Hydra-style overrides outside a Hydra app (tools, tests, benchmarks)."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return to_config(compose(config_name="config", overrides=list(overrides or [])))
