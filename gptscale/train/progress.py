"""How far the run has come: optimizer steps taken and tokens consumed (a checkpointed component)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Progress:
    step: int = 0
    consumed_tokens: int = 0

    def advance(self, tokens: int) -> None:
        self.step += 1
        self.consumed_tokens += tokens

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.consumed_tokens = int(state["step"]), int(state["consumed_tokens"])
