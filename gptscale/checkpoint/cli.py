"""``gptscale-ckpt inspect PATH``: what a checkpoint holds and whether it is complete (exit status 1 if not).

Reads the manifest, ``config.yaml`` and the files' sizes and checksums: no torch.distributed, no model.
PATH is a checkpoint directory, or a run or checkpoints directory (its newest complete checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from gptscale.checkpoint.files import CONFIG, RANKS, describe_model, read_config, read_rank_state
from gptscale.checkpoint.manifest import CheckpointError, find_damage, read_manifest
from gptscale.checkpoint.publish import resolve
from gptscale.config.layout import describe_saved


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


def _layout(layout: dict | None) -> str:
    if not layout:
        return "none (weights only: loads at any layout)"
    return f"{describe_saved(layout)}, {layout['precision']} ({layout['world_size']} ranks); loads at any layout"


def inspect(path: Path, checksums: bool = True) -> int:
    """Print a report of the checkpoint at ``path``; returns the exit status (0 complete, 1 not)."""
    root = resolve(str(path), path)
    try:
        manifest = read_manifest(root)
    except CheckpointError as error:
        print(f"{root}: INCOMPLETE\n  {error}")
        return 1
    problems = find_damage(root, manifest, sorted(manifest["files"]), checksums)
    print(f"{root}: {'DAMAGED' if problems else 'complete'}" + ("" if checksums else " (sizes checked, not checksums)"))
    for problem in problems:
        print(f"  ! {problem}")
    contents = manifest["contents"]
    parts = Counter()
    for name, entry in manifest["files"].items():
        parts[name.split("/")[0]] += entry["bytes"]
    saved = read_config(root) if (root / CONFIG).is_file() else None
    model = describe_model(saved.model) if saved else manifest["model"]
    optimizer = f"{saved.optim.name}'s" if saved else "optimizer"
    rows = [
        ("step", f"{manifest['step']}"),
        ("tokens", f"{manifest['consumed_tokens']:,}"),
        ("saved", manifest["saved_at"]),
        ("layout", _layout(manifest["layout"])),
        ("model", model),
        (
            "holds",
            "fp32 master weights"
            + (f", {optimizer} state and step count" if contents["optimizer"] else "")
            + (f"; per-rank states of {', '.join(contents['components'])}" if contents["components"] else ""),
        ),
        (
            "size",
            f"{_size(manifest['bytes'])} in {len(manifest['files'])} files: "
            + ", ".join(f"{part} {_size(count)}" for part, count in parts.most_common()),
        ),
    ]
    for label, value in rows:
        print(f"  {label:<8} {value}")
    if not problems:
        try:
            _print_exclusions(root, contents)
        except CheckpointError as error:  # a rank file that is not plain data: refused, never unpickled
            problems = [str(error)]
            print(f"  ! {error}")
    if (root / CONFIG).is_file():
        print("  config:")
        for line in (root / CONFIG).read_text().splitlines():
            print(f"    {line}")
    return 1 if problems else 0


def _print_exclusions(root: Path, contents: dict, shown: int = 20) -> None:
    """The documents the train loader excludes (``data.exclude`` and loss spikes), from rank 0's saved state."""
    if "train_data" not in contents["components"] or not (root / RANKS).is_dir():
        return
    excluded = read_rank_state(root, 0)["components"]["train_data"].get("exclude", [])
    print(f"  {'excluded':<8} {len(excluded)} documents" + (":" if excluded else ""))
    for identity in excluded[:shown]:
        print(f"    {identity}")
    if len(excluded) > shown:
        print(f"    ... and {len(excluded) - shown} more")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gptscale-ckpt", description="Inspect gptscale checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_parser = commands.add_parser("inspect", help="what a checkpoint holds; exit status 1 if incomplete")
    inspect_parser.add_argument("path", type=Path)
    inspect_parser.add_argument(
        "--no-checksums", action="store_true", help="check file sizes only, not CRC-32 (faster on large checkpoints)"
    )
    args = parser.parse_args(argv)
    sys.exit(inspect(args.path, checksums=not args.no_checksums))


if __name__ == "__main__":
    main()
