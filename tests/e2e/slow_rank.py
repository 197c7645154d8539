"""gptscale.train whose rank 1 computes slowly (a test's fault injection: each of its forward passes sleeps
0.25 s first), a straggler the other rank waits for at every step."""

import os
import time

from gptscale.train import step
from gptscale.train.__main__ import main

forward = step._forward


def slow_forward(model, batch):
    time.sleep(0.25)
    return forward(model, batch)


if __name__ == "__main__":  # not in the helper processes a save spawns
    if os.environ.get("RANK") == "1":
        step._forward = slow_forward
    main()
