"""One data-parallel rank of a data-only job: serves STEPS global batches through build_data, optionally
resuming from a saved loader state, and writes the labels it served and its final loader state.

Usage: torchrun --nproc_per_node=N tests/dist/run_data.py JOB.json
JOB.json: {"dataset", "global_batch", "micro_batch", "seq_len", "steps", "workers", "resume" (path or null),
"output" (directory), optionally "exclude" (data.exclude)}.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gptscale.config.layout import Layout
from gptscale.config.schema import DataConfig
from gptscale.data import build_data


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = Layout(world, 1, 1, 1, world, job["micro_batch"], job["global_batch"])
    data = build_data(
        DataConfig(path=job["dataset"], workers=job["workers"], exclude=job.get("exclude", [])),
        layout,
        rank,
        job["seq_len"],
    )
    if job["resume"]:
        data.train.load_state_dict(json.loads(Path(job["resume"]).read_text()))
    labels, first = [], None
    for _ in range(job["steps"] * layout.num_microbatches):
        batch = next(data.train)
        first = int(batch["tokens"][0, 0]) if first is None else first
        labels += batch["labels"][batch["loss_mask"].bool()].tolist()
    states = [None] * world
    dist.all_gather_object(states, data.train.state_dict())
    assert all(state == states[0] for state in states), "ranks disagree on the loader state"
    output = Path(job["output"])
    (output / f"rank{rank}.json").write_text(json.dumps({"labels": labels, "first": first}))
    if rank == 0:
        (output / "state.json").write_text(json.dumps(states[0]))
    data.train.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
