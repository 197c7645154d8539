"""Shared fixtures: one tokenizer and one briefly trained model per architecture for the whole session."""

import pytest

from tests.convert.models import tiny_config, train_state, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def trained(tokenizer_file):
    """model name -> (config, trained tensors); trained on demand, once."""
    cache = {}

    def get(model: str):
        if model not in cache:
            cfg = tiny_config(model)
            cache[model] = cfg, train_state(cfg, tokenizer_file)
        return cache[model]

    return get
