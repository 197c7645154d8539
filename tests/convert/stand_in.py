"""A stand-in for ``gptscale.checkpoint.read`` (issue 4) so the command lines can be tested before it lands:
"checkpoints" are kept in memory by path. tests/convert/test_checkpoints.py tests the real reader."""

from __future__ import annotations

import sys
import types
from pathlib import Path


class StandInCheckpoints:
    def __init__(self, monkeypatch):
        self.saved: dict[Path, tuple] = {}
        module = types.ModuleType("gptscale.checkpoint.read")
        module.load_model_state = self.load_model_state
        module.save_model_state = self.save_model_state
        monkeypatch.setitem(sys.modules, "gptscale.checkpoint.read", module)

    def add(self, path: Path, cfg, state, tokenizer_file) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "stand-in").write_text("weights are held in memory by the test\n")
        self.saved[path.resolve()] = (cfg, state, tokenizer_file)
        return path

    def load_model_state(self, path: Path):
        if Path(path).resolve() not in self.saved:
            raise FileNotFoundError(f"{path} is not a complete checkpoint")
        return self.saved[Path(path).resolve()]

    def save_model_state(self, path: Path, cfg, tensors, tokenizer_file) -> None:
        self.add(Path(path), cfg, {k: v.clone() for k, v in tensors.items()}, tokenizer_file)
        self.last_saved = (cfg, tensors, tokenizer_file)
