"""Bad input fails naming the shard or member, or with data.on_error=skip is masked, warned about and counted."""

import io
import logging
import tarfile

import pytest

from gptscale.data.loader import Source, StreamingLoader
from gptscale.data.manifest import DataError, read_manifest
from tests.datasets import layout, make_dataset, random_documents, rewrite_manifest_entry

SEQ_LEN = 16


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "numbers", random_documents(80, 0, 1000, seed=5), shard_size=2000)


def first_epoch(directory, on_error):
    """Read one epoch on one rank; returns the loader (for its skip counts) and the masked-label count."""
    manifest = read_manifest(str(directory))
    loader = StreamingLoader([Source(manifest, "train", 1.0)], layout(1, 4, 4), 0, SEQ_LEN, seed=0, on_error=on_error)
    masked = 0
    for _ in range(loader.orders[0].rows):
        masked += int((next(loader)["loss_mask"] == 0).sum())
    return loader, masked


def rewrite_tar(path, change_member):
    """Rewrite a shard's members through ``change_member(index, data) -> data``."""
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index, (info, data) in enumerate(members):
            data = change_member(index, data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def truncate(directory):
    path = directory / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:700])


def not_zstd(directory):
    path = directory / "train-000001.tar"
    rewrite_tar(path, lambda i, data: b"this is not zstd at all" if i == 1 else data)
    rewrite_manifest_entry(directory, path.name)


def flip_a_byte(directory):
    path = directory / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))


def delete(directory):
    (directory / "train-000001.tar").unlink()


def truncated_tar_with_matching_manifest(directory):
    path = directory / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:1000])
    rewrite_manifest_entry(directory, path.name)


BAD_INPUTS = {
    "truncated tar": (truncate, "train-000001.tar is truncated"),
    "tar cut inside a member": (truncated_tar_with_matching_manifest, "train-000001.tar is not a readable tar"),
    "member not zstd": (not_zstd, r"train-000001.tar: member 000000\d+.tokens.zst is not valid zstd"),
    "checksum mismatch": (flip_a_byte, "train-000001.tar: checksum .* differs from the manifest"),
    "missing shard": (delete, "shard .*train-000001.tar listed in the manifest is missing"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_shard_raises_naming_it(dataset, bad):
    damage, message = BAD_INPUTS[bad]
    damage(dataset)
    with pytest.raises(DataError, match=message):
        first_epoch(dataset, "raise")


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_shard_is_skipped_counted_and_logged(dataset, bad, caplog):
    _, clean = first_epoch(dataset, "raise")
    damage, message = BAD_INPUTS[bad]
    damage(dataset)
    with caplog.at_level(logging.WARNING, logger="gptscale"):
        loader, masked = first_epoch(dataset, "skip")
    assert loader.skipped["shards"] == 1
    assert masked > clean  # the shard's tokens are masked, everything else is served in its place
    assert any("skipping shard" in r.message and "train-000001.tar" in r.message for r in caplog.records)


def test_corrupt_document_payload_is_skipped_alone(dataset, caplog):
    """A member whose frame header is fine but whose data is not: only that document is masked."""
    path = dataset / "train-000001.tar"

    def corrupt(index, data):
        return data[:-5] + bytes(b ^ 0xFF for b in data[-5:]) if index == 0 else data

    rewrite_tar(path, corrupt)
    rewrite_manifest_entry(dataset, path.name)
    with pytest.raises(DataError, match=r"train-000001.tar: member 000000\d+.tokens.zst is not valid zstd"):
        first_epoch(dataset, "raise")
    with caplog.at_level(logging.WARNING, logger="gptscale"):
        loader, _ = first_epoch(dataset, "skip")
    assert loader.skipped == {"shards": 0, "documents": 1}
    assert any("skipping a document" in r.message for r in caplog.records)


def test_missing_or_broken_manifest_names_it(tmp_path):
    with pytest.raises(DataError, match="nowhere/manifest.json: no manifest"):
        read_manifest(str(tmp_path / "nowhere"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="broken/manifest.json: cannot read"):
        read_manifest(str(tmp_path / "broken"))


def test_skipping_more_than_the_bound_stops_naming_the_share(dataset):
    """With every shard bad, data.on_error=skip used to train on masked padding (loss 0) without a word."""
    for path in dataset.glob("train-*.tar"):
        data = bytearray(path.read_bytes())
        data[600] ^= 0xFF
        path.write_bytes(bytes(data))
    manifest = read_manifest(str(dataset))
    loader = StreamingLoader(
        [Source(manifest, "train", 1.0)],
        layout(1, 4, 4),
        0,
        SEQ_LEN,
        seed=0,
        on_error="skip",
        max_skipped_fraction=0.01,
    )
    with pytest.raises(
        DataError,
        match=r"data.on_error=skip has skipped \d+ shards, .* \(100.0%\), more than "
        r"data.max_skipped_fraction=0.01",
    ):
        next(loader)


def test_skipping_within_the_bound_goes_on(dataset):
    flip_a_byte(dataset)
    manifest = read_manifest(str(dataset))
    loader = StreamingLoader(
        [Source(manifest, "train", 1.0)], layout(1, 4, 4), 0, SEQ_LEN, seed=0, on_error="skip", max_skipped_fraction=1.0
    )
    for _ in range(loader.orders[0].rows):
        next(loader)
    assert loader.skipped["shards"] == 1
