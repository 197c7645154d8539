"""Configuration: the typed schema Hydra validates against, and the layout checks run before any work."""

from gptscale.config.layout import Layout
from gptscale.config.schema import Config
from gptscale.config.store import CONFIG_DIR, load_config, register_schema, to_config
from gptscale.config.validate import ConfigError, check

__all__ = ["CONFIG_DIR", "Config", "ConfigError", "Layout", "check", "load_config", "register_schema", "to_config"]
