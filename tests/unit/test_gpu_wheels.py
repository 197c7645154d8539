"""The GPU wheelhouse (tools/gpu_wheels.sh) must not rot: the device reaches no registry, so a pin without a
CPython 3.12 wheel, or a requirement neither the wheelhouse nor the image meets, is found only there, at the
cost of a device call. Built once into a cache folder (about 40 s cold, 17 MB; then a no-op)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from tests.helpers import REPO

WHEELS = Path(os.environ.get("GPTSCALE_WHEEL_CACHE", Path.home() / ".cache/gptscale-wheels")) / "gpu-py312"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# The device: python3 3.12.3 on Linux x86_64.
DEVICE = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
DEVICE_LIMIT = 64 * 2**20  # what travels to the device: working tree and carried paths together


def listed(path: Path) -> dict[str, str | None]:
    """name -> pinned version (None where the list gives none) of a requirements-style list."""
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            entries[canonicalize_name(name)] = version or None
    return entries


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10)
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    proc = subprocess.run(
        ["bash", "tools/gpu_wheels.sh", "build"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "GPU_WHEELS": str(WHEELS), "PYTHON": sys.executable},
        timeout=600,
    )
    if proc.returncode != 0:
        if not pypi_reachable():
            pytest.skip(f"PyPI is unreachable and {WHEELS} holds no built wheelhouse")
        raise AssertionError(proc.stderr[-4000:])
    return WHEELS


def test_every_pin_has_a_wheel_for_the_device(wheelhouse, tmp_path):
    """pip itself, told the device's Python and platforms and given no index, picks each pin from the folder."""
    report = tmp_path / "report.json"
    platforms = [f"--platform={p}" for p in PLATFORMS]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--no-deps",
            "--ignore-installed",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            "--abi",
            "cp312",
            "--abi",
            "abi3",
            "--abi",
            "none",
            *platforms,
            "--platform=any",
            "--no-index",
            "--find-links",
            str(wheelhouse),
            "--target",
            str(tmp_path / "site"),
            "--report",
            str(report),
            "-r",
            str(REPO / "tools/gpu_wheels.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    chosen = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert chosen == listed(REPO / "tools/gpu_wheels.txt")


def test_every_requirement_is_met_by_the_wheelhouse_or_the_image(wheelhouse):
    """Each wheel's requirements on the device (markers for Python 3.12, extras ignored): in the wheelhouse at a
    version that satisfies them, or among the image's packages (at its recorded version, where known)."""
    house, metadata = {}, {}
    for wheel in wheelhouse.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        house[name] = str(version)
        with zipfile.ZipFile(wheel) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata[name] = Parser().parsestr(archive.read(meta).decode())
    image = listed(REPO / "tools/gpu_image.txt")
    assert canonicalize_name("torch") in image and not set(listed(REPO / "tools/gpu_wheels.txt")) & set(image)
    unmet = []
    for name, meta in metadata.items():
        for line in meta.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(DEVICE):
                continue
            dep = canonicalize_name(req.name)
            if dep in image and (image[dep] is None or req.specifier.contains(image[dep], prereleases=True)):
                continue
            if dep in house and req.specifier.contains(house[dep], prereleases=True):
                continue
            unmet.append(f"{name} needs {line}")
    assert not unmet, unmet


def test_wheelhouse_and_working_tree_fit_one_device_call(wheelhouse):
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    tree = sum((REPO / path).stat().st_size for path in tracked.decode().split("\0") if (REPO / path).is_file())
    wheels = sum(path.stat().st_size for path in wheelhouse.glob("*.whl"))
    assert tree + wheels < DEVICE_LIMIT, f"tree {tree / 2**20:.1f} MiB + wheels {wheels / 2**20:.1f} MiB"
