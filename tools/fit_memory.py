"""Whether a long run's trainer process grows: its resident memory at a few steps of a CPU run.

    python tools/fit_memory.py [STEPS] [hydra overrides ...]     (default 2000 steps of gpt2-tiny)

Prints the RSS after the warm-up (step 100) and at every quarter of the run; a trainer that keeps something per
step grows with the steps, one that does not stays flat within the allocator's noise.
"""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptscale.config import load_config  # noqa: E402
from gptscale.train.trainer import Trainer  # noqa: E402


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(steps: int, overrides: list[str]) -> None:
    marks = {100, steps // 4, steps // 2, 3 * steps // 4, steps}
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(
            [
                f"run_dir={run_dir}",
                f"train.steps={steps}",
                "train.seq_len=32",
                "parallel.global_batch=4",
                "parallel.micro_batch=4",
                "train.eval_interval=0",
                "train.log_interval=100",
                "checkpoint.save_final=false",
                "checkpoint.interval_minutes=0",
                *overrides,
            ]
        )
        trainer = Trainer(cfg)
        seen = {}
        try:
            trainer.fit(on_step=lambda step, result: seen.update({step: rss_mib()}) if step in marks else None)
        finally:
            trainer.close()
    for step in sorted(seen):
        print(f"step {step:>6}: RSS {seen[step]:8.1f} MiB ({seen[step] - seen[min(seen)]:+.1f} since step {min(seen)})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000, sys.argv[2:])
