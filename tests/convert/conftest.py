"""Shared fixtures: one tokenizer and one briefly trained model per architecture for the whole session."""

import os

import pytest

from tests.convert.models import tiny_config, train_state, train_tokenizer


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@pytest.fixture(scope="package", autouse=True)
def rank_variables_stay_here():
    """Models built in this process form a one-rank group, which sets RANK, LOCAL_RANK and WORLD_SIZE in
    os.environ (gptscale.parallel.groups). Put them back once these tests are done, so that commands later
    tests start (a plain gptscale-train, a SLURM job) are not taken for ranks of a torchrun job."""
    saved = {name: os.environ.get(name) for name in RANK_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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
