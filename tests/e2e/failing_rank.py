"""gptscale.train whose rank 1 raises in its third step (a test's fault injection): a rank's own error, which
the launcher must report as the first failure while the other rank fails after it, waiting for rank 1."""

import os

from gptscale.train.__main__ import main
from gptscale.train.trainer import Trainer

train_one_step = Trainer.train_one_step


def failing_step(self):
    if self.step == 2:
        raise RuntimeError("injected failure in step 3 of rank 1")
    return train_one_step(self)


if __name__ == "__main__":  # not in the helper processes a save spawns
    if os.environ.get("RANK") == "1":
        Trainer.train_one_step = failing_step
    main()
