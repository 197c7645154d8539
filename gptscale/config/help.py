"""``gptscale-train --help``: one page of the groups and keys users type, each key's meaning read from the
comment beside (or above) its field in schema.py, so the page cannot drift from the schema."""

from __future__ import annotations

import dataclasses
import inspect
import re
from enum import Enum

from gptscale.config.schema import Config
from gptscale.config.store import CONFIG_DIR

_FIELD = re.compile(r"^\s{4}(\w+):[^#]*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s{4}#\s*(.*)$")


def field_comments(cls) -> dict[str, str]:
    """Each field's comment: the one on its line, else the comment lines right above it."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        comment, field = _COMMENT.match(line), _FIELD.match(line)
        if comment:
            above.append(comment.group(1))
        elif field:
            comments[field.group(1)] = field.group(2) or " ".join(above)
            above = []
        else:
            above = []
    return comments


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return value.value
    return "null" if value is None else str(value)


def _keys(node, prefix: str) -> list[tuple[str, str, str]]:
    comments = field_comments(type(node))
    rows = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            rows += _keys(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", _text(value), comments.get(f.name, "")))
    return rows


def choices() -> dict[str, list[str]]:
    """Groups whose files are alternatives (``model=llama-7b``), with the files conf/ holds."""
    found = {}
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        names = sorted(f.stem for f in group.glob("*.yaml"))
        if len(names) > 1:
            found[group.name] = names
    return found


def help_page(cfg: Config) -> str:
    """The page for ``cfg`` (the default job: its values are the defaults shown)."""
    lines = [
        "usage: gptscale-train [GROUP=CHOICE] [KEY=VALUE ...]   (torchrun -m gptscale.train takes the same)",
        "",
        "  -m KEY=A,B ...        a sweep, each run in its own directory (hydra/launcher=slurm submits it)",
        "  --cfg job --resolve   print the configuration a command line gives, without training",
        "  -h, --help            this page",
        "",
        "Choices:",
    ]
    for group, names in choices().items():
        lines.append(f"  {group}=  " + ", ".join(names))
    for top in dataclasses.fields(cfg):
        value = getattr(cfg, top.name)
        rows = (
            _keys(value, f"{top.name}.")
            if dataclasses.is_dataclass(value)
            else [(top.name, _text(value), field_comments(Config).get(top.name, ""))]
        )
        lines += ["", f"{top.name}:" if dataclasses.is_dataclass(value) else "run:"]
        width = max(len(f"{key}={default}") for key, default, _ in rows)
        lines += [f"  {key}={default}".ljust(width + 4) + meaning for key, default, meaning in rows]
    lines += ["", "Every key is checked: a misspelt or unknown one fails with its name. README.md and docs/ say more."]
    return "\n".join(lines)
