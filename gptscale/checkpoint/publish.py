"""Where checkpoints live and how one becomes visible: temporary name, atomic rename, ``latest``, retention.

``RUN_DIR/checkpoints/step_000012/`` is written as ``step_000012.tmp-<id>/`` and renamed once every rank
has written and the manifest is in place, so a directory named ``step_NNNNNN`` is complete whatever kills
the job and when. ``latest``, a one-line file replaced atomically, names the newest one; readers that find
it stale fall back to the newest complete directory. Old checkpoints are renamed out of the way before
they are deleted, so a half-deleted one never looks complete either. Only global rank 0 calls the
functions that change the directory.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

from gptscale.checkpoint.manifest import MANIFEST, fsync_dir

LATEST = "latest"
REWOUND = "rewound"  # checkpoints of steps a rewind abandoned
_PUBLISHED = re.compile(r"^step_(\d+)$")
_UNFINISHED = re.compile(r"^step_\d+\.(tmp|trash)-")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def staging_dir(root: Path, step: int, nonce: str) -> Path:
    return root / f"{step_name(step)}.tmp-{nonce}"


def new_nonce() -> str:
    return uuid.uuid4().hex[:8]


def _published(root: Path) -> dict[int, Path]:
    """Directories under ``root`` with a published name, by step (oldest first)."""
    found = {}
    if root.is_dir():
        for path in root.iterdir():
            match = _PUBLISHED.match(path.name)
            if match and path.is_dir():
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def complete_checkpoints(root: Path) -> dict[int, Path]:
    """Published checkpoints under ``root`` by step (a published name with its manifest)."""
    return {step: path for step, path in _published(root).items() if (path / MANIFEST).is_file()}


def latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root``: the one ``latest`` names, or else the newest found."""
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / MANIFEST).is_file():
            return named
    found = complete_checkpoints(root)
    return found[max(found)] if found else None


def _write_latest(root: Path, name: str) -> None:
    partial = root / f"{LATEST}.partial-{new_nonce()}"
    with open(partial, "w") as file:
        file.write(name + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, root / LATEST)
    fsync_dir(root)


def _discard(path: Path) -> None:
    """Rename, then delete: an interrupted deletion leaves a name no reader takes for a checkpoint."""
    trash = path.with_name(f"{path.name}.trash-{new_nonce()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish(staging: Path, final: Path) -> None:
    """Make a fully written checkpoint visible under its final name and point ``latest`` at it."""
    fsync_dir(staging)
    if final.exists():  # the same step saved again after resuming from an older checkpoint
        _discard(final)
    os.rename(staging, final)
    fsync_dir(final.parent)
    _write_latest(final.parent, final.name)


def prune(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (0: keep all) that are not a multiple of
    ``keep_every`` (0: none); the newest always stays. Returns the deleted paths."""
    found = complete_checkpoints(root)
    if keep_last <= 0 or not found:
        return []
    keep = set(list(found)[-keep_last:]) | {max(found)}
    if keep_every > 0:
        keep |= {step for step in found if step % keep_every == 0}
    deleted = [path for step, path in found.items() if step not in keep]
    for path in deleted:
        _discard(path)
    return deleted


def set_aside(root: Path, newest_kept: int) -> list[Path]:
    """Move the complete checkpoints after step ``newest_kept`` to ``root/rewound/`` (a rewind abandons their
    steps; kept for a look, never resumed) and point ``latest`` at the newest one left."""
    found = complete_checkpoints(root)
    moved = []
    for step, path in found.items():
        if step > newest_kept:
            aside = root / REWOUND / f"{path.name}-{new_nonce()}"
            aside.parent.mkdir(exist_ok=True)
            os.rename(path, aside)
            moved.append(aside)
    if newest_kept in found:
        _write_latest(root, found[newest_kept].name)
    return moved


def remove_unfinished(root: Path) -> list[Path]:
    """Delete what interrupted saves and deletions left behind (never a published checkpoint)."""
    leftovers = [p for p in root.iterdir() if _UNFINISHED.match(p.name)] if root.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def resume_candidates(root: Path) -> list[Path]:
    """What ``checkpoint.resume=auto`` tries, in order: every published name under ``root``, newest first,
    those without a manifest included (a published name without one is damaged, and is named as such)."""
    return list(reversed(_published(root).values()))


def resolve(spec: str, checkpoints: Path) -> Optional[Path]:
    """The checkpoint ``checkpoint.resume`` asks for: ``none``, ``auto`` (newest complete one in this run, if
    any) or a path: a checkpoint directory, or a run or checkpoints directory (its newest)."""
    if spec == "none":
        return None
    if spec == "auto":
        return latest(checkpoints)
    path = Path(spec).expanduser()
    if (path / MANIFEST).exists() or _PUBLISHED.match(path.name) or _UNFINISHED.match(path.name):
        return path
    for root in (path, path / "checkpoints"):
        newest = latest(root)
        if newest is not None:
            return newest
    return path
