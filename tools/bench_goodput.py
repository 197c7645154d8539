"""What goodput's bookkeeping costs rank 0 (issue 24): one record per step appended to RUN_DIR/goodput.jsonl,
the metrics read at a log step, and the replay of the whole file each attempt makes at start-up.

    python tools/bench_goodput.py [--steps 20000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gptscale, installed or not

from gptscale.tracking.goodput import GOODPUT, GoodputLog, replay  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000, help="step records to write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        log = GoodputLog(Path(run_dir), writes=True)
        log.started(resumed=None)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            log.mark("step", step)
        per_record = (time.perf_counter() - start) / args.steps
        start = time.perf_counter()
        log.metrics()
        metrics = time.perf_counter() - start
        log.close()
        size = (Path(run_dir) / GOODPUT).stat().st_size
        start = time.perf_counter()
        replay(Path(run_dir))
        replayed = time.perf_counter() - start
    print(
        f"step record: {per_record * 1e6:.1f} us, {size / args.steps:.0f} bytes; metrics at a log step: "
        f"{metrics * 1e6:.0f} us; replay of {args.steps:,} steps at start-up: {replayed:.2f} s"
    )


if __name__ == "__main__":
    main()
