"""build_data, the trainer's single entry: datasets by path, URL or pipe command, blends, the embedded corpus."""

import functools
import http.server
import os
import shutil
import threading

import pytest
import torch

from gptscale.config import ConfigError, check, load_config
from gptscale.config.schema import DataConfig, DataSourceConfig
from gptscale.data import build_data
from gptscale.data.embedded import embedded_dataset
from gptscale.data.manifest import DataError, read_manifest
from tests.datasets import layout, make_dataset, random_documents

LAYOUT = layout(1, 2, 4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("build") / "numbers",
        random_documents(150, 0, 1000, seed=9),
        shard_size=3000,
        val_fraction=0.2,
    )


def first_batches(data, count=4):
    return [next(data.train)["tokens"] for _ in range(count)]


@pytest.mark.parametrize("url", ["{dir}", "file://{dir}", "pipe:cat {dir}/{{}}"])
def test_local_paths_urls_and_pipe_commands_read_the_same(dataset, url, tmp_path):
    reference = build_data(DataConfig(path=str(dataset), cache_dir=str(tmp_path)), LAYOUT, 0, 16)
    data = build_data(DataConfig(path=url.format(dir=dataset), cache_dir=str(tmp_path)), LAYOUT, 0, 16)
    assert all(torch.equal(a, b) for a, b in zip(first_batches(reference), first_batches(data)))
    assert data.tokenizer_file.read_bytes() == (dataset / "tokenizer.json").read_bytes()
    assert data.vocab_size == 1001 and data.eod == 1000 and data.valid is not None
    next(data.valid)


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http URLs with curl")
def test_http_dataset_streams_and_its_tokenizer_is_fetched_into_the_cache(dataset, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(dataset))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        data = build_data(DataConfig(path=url, cache_dir=str(tmp_path)), LAYOUT, 0, 16)
        reference = build_data(DataConfig(path=str(dataset), cache_dir=str(tmp_path)), LAYOUT, 0, 16)
        assert all(torch.equal(a, b) for a, b in zip(first_batches(reference), first_batches(data)))
    finally:
        server.shutdown()
        thread.join()
    assert data.tokenizer_file.parent == tmp_path / "tokenizers"
    assert data.tokenizer_file.read_bytes() == (dataset / "tokenizer.json").read_bytes()


def test_sources_blend_datasets_sharing_a_tokenizer(dataset, tmp_path):
    other = make_dataset(tmp_path / "other", random_documents(60, 0, 1000, seed=10))
    cfg = DataConfig(
        sources=[DataSourceConfig(str(dataset), 0.5), DataSourceConfig(str(other), 0.5)], cache_dir=str(tmp_path)
    )
    data = build_data(cfg, LAYOUT, 0, 16)
    assert [s["weight"] for s in data.train.state_dict()["sources"]] == [0.5, 0.5]
    different = make_dataset(tmp_path / "different", random_documents(60, 0, 500, seed=11), vocab=500)
    cfg.sources[1].path = str(different)
    with pytest.raises(DataError, match="different tokenizers"):
        build_data(cfg, LAYOUT, 0, 16)


def test_embedded_corpus_is_prepared_once_and_cached(tmp_path):
    first = embedded_dataset(60_000, 300, tmp_path)
    manifest = read_manifest(str(first))
    assert manifest.vocab_size == 300 and len(manifest.shards("train")) >= 1
    stamp = os.stat(first / "manifest.json").st_mtime_ns
    assert embedded_dataset(60_000, 300, tmp_path) == first
    assert os.stat(first / "manifest.json").st_mtime_ns == stamp
    assert embedded_dataset(50_000, 300, tmp_path) != first  # other content, other cache entry
    assert not [p for p in (tmp_path / "embedded").iterdir() if "tmp" in p.name]
    data = build_data(
        DataConfig(embedded_max_bytes=60_000, embedded_vocab_size=300, cache_dir=str(tmp_path)), LAYOUT, 0, 16
    )
    assert data.vocab_size == 300 and data.tokenizer_file == first / "tokenizer.json"


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["data.path=/a", "data.sources=[{path: /b, weight: 1.0}]"], "data.path and data.sources"),
        (["data.sources=[{path: /b, weight: 0.0}]"], "data.sources[0].weight"),
        (["data.on_error=ignore"], "data.on_error"),
        (["data.workers=-1"], "data.workers"),
        (["data.embedded_vocab_size=100"], "data.embedded_vocab_size"),
    ],
)
def test_bad_data_settings_name_the_field(overrides, field):
    overrides = [o.replace("data.sources", "data.sources") for o in overrides]
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        check(load_config(overrides), 1)
