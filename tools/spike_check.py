"""False-positive check of the spike detector: trains a healthy run and prints its skipped steps and z-scores.

    python tools/spike_check.py [OVERRIDES...]     # default: the README's job, 300 steps

Prints the steps skipped as spikes (there should be none), the largest deciding score (``train.spike.signal``:
the loss z-score, or the smaller or larger of the loss and grad-norm ones) and the largest z-score of each, over
the steps after the detector's window filled.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gptscale, installed or not

from gptscale.config import load_config  # noqa: E402
from gptscale.train.guard import SpikeDetector  # noqa: E402
from gptscale.train.trainer import Trainer  # noqa: E402


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(
            [
                f"run_dir={run_dir}",
                "train.steps=300",
                "train.eval_interval=0",
                "checkpoint.save_final=false",
                *overrides,
            ]
        )
        start = time.perf_counter()
        trainer = Trainer(cfg)
        try:
            history = {"loss": [], "grad_norm": []}

            def record(step, result):
                history["loss"].append(result.loss.item())
                history["grad_norm"].append(result.grad_norm.item())

            trainer.fit(on_step=record)
            skipped = trainer.spikes.skipped
        finally:
            trainer.close()
    spike = cfg.train.spike
    replay = SpikeDetector(spike.zscore, spike.window, spike.min_relative_std, spike.signal)
    scores = []
    for loss, norm in zip(history["loss"], history["grad_norm"]):
        loss_z, norm_z = replay.zscores(loss, norm)
        if loss_z is not None and norm_z is not None:
            scores.append((loss_z, norm_z))
        replay.add(loss, norm)  # exact only while nothing was skipped, which is what this checks
    deciding = max(replay.deciding(*s) for s in scores)
    print(
        f"{cfg.train.steps} steps in {time.perf_counter() - start:.0f} s: {skipped} skipped as spikes "
        f"(train.spike.zscore={spike.zscore}); max deciding z {deciding:.2f}, max loss z "
        f"{max(s[0] for s in scores):.2f}, max grad-norm z {max(s[1] for s in scores):.2f}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
