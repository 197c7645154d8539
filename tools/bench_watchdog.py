"""What the hang watchdog costs the training thread: the phase changes of one step (a step, a data wait per
micro-batch, the checkpoint phase), timed in a loop with the watchdog thread running.

    python tools/bench_watchdog.py [--micro-batches 4] [--steps 20000]

The watchdog thread's own work (a heartbeat to the store at each step and each checkpoint phase) runs while
the training thread waits in the step's kernels and collectives; gptscale-bench with ``fault.detect_hangs``
on and off measures the whole (docs/benchmarks.md).
"""

import argparse
import tempfile
import time

from gptscale.config.schema import FaultConfig
from gptscale.fault.watchdog import CHECKPOINT_SAVE, DATA_WAIT, STEP, Watchdog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args()
    watchdog = Watchdog(FaultConfig(), tempfile.mkdtemp(), rank=0, world_size=1)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        watchdog.enter(STEP, step)
        for _ in range(args.micro_batches):
            watchdog.enter(DATA_WAIT, step)
            watchdog.enter(STEP, step)
        watchdog.enter(CHECKPOINT_SAVE, step)
    seconds = time.perf_counter() - start
    watchdog.close()
    print(
        f"{seconds / args.steps * 1e6:.1f} us of the training thread per step ({args.micro_batches} micro-batches, "
        f"{2 * args.micro_batches + 2} phase changes), {watchdog.beats} heartbeats published"
    )


if __name__ == "__main__":
    main()
