"""``gptscale-bench``: training throughput of one or several configs, side by side, in one process run.

    gptscale-bench model=gpt2-350m train.precision=bf16 parallel.zero=1 bench.steps=20
    gptscale-bench model=gpt2-tiny --compare "model.attention=sdpa" "model.attention=unfused"
    torchrun --nproc_per_node=2 -m gptscale.bench model=gpt2-tiny --compare "parallel.tp=2" "parallel.tp=1"

Overrides before ``--compare`` apply to every config; each quoted ``--compare`` argument adds its own.
Every config is checked before the first one runs. Rank 0 prints one row per config and, with
``bench.output=FILE``, appends one JSON line per config (figures, layout, device, versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys

from gptscale.config import ConfigError, check, load_config
from gptscale.config.schema import Config

# A benchmark neither resumes nor saves, evaluates nor reports to trackers; its run_dir stays apart.
BENCH_DEFAULTS = [
    "run_dir=runs/bench/${model.name}",
    "checkpoint.resume=none",
    "checkpoint.save_final=false",
    "train.eval_interval=0",
    "logging.wandb.mode=disabled",
]

HEADER = (
    f"{'config':<40} {'ranks':>5} {'layout':<26} {'tokens/s':>11} {'spread':>13} {'TFLOP/s/dev':>11} "
    f"{'MFU':>6} {'step ms':>9} {'peak mem GiB':>19} {'loss':>7} {'vs first':>8}"
)


def parse_args(argv: list[str]) -> tuple[list[str], list[str]]:
    parser = argparse.ArgumentParser(
        prog="gptscale-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides for every config (model=, parallel.*, train.*, bench.steps, bench.warmup, ...)",
    )
    parser.add_argument(
        "--compare", nargs="+", metavar="OVERRIDES", default=[""], help="one quoted override list per config"
    )
    args = parser.parse_args(argv)
    return args.overrides, args.compare


def load_configs(common: list[str], variants: list[str], world_size: int) -> list[tuple[str, list[str], Config]]:
    """(label, overrides, config) per variant, all checked for this world size before any runs."""
    configs = []
    for variant in variants:
        overrides = [*common, *shlex.split(variant)]
        cfg = load_config([*BENCH_DEFAULTS, *overrides])
        check(cfg, world_size)
        configs.append((variant or " ".join(common) or "defaults", overrides, cfg))
    return configs


def format_row(result, first) -> str:
    mfu = "n/a" if result.mfu is None else f"{result.mfu:.1%}"
    memory = f"{result.peak_memory_gib:.2f} ({'alloc' if result.memory_kind == 'max allocated' else 'RSS'})"
    fastest, slowest = (
        result.tokens_per_step / t for t in (min(result.window_step_times_s), max(result.window_step_times_s))
    )
    spread = f"{slowest:,.0f}-{fastest:,.0f}" if len(result.window_step_times_s) > 1 else "-"
    return (
        f"{result.label[:40]:<40} {result.world_size:>5} {result.layout:<26} {result.tokens_per_s:>11,.0f} "
        f"{spread:>13} {result.tflops_per_device:>11.4f} {mfu:>6} {result.step_time_s * 1e3:>9.1f} {memory:>19} "
        f"{result.losses[-1]:>7.3f} {result.tokens_per_s / first.tokens_per_s:>7.2f}x"
    )


def main(argv: list[str] | None = None) -> None:
    common, variants = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    for chatty in ("megatron", "DeepSpeed"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    try:
        configs = load_configs(common, variants, world_size)
        from gptscale.bench.measure import device_name, measure, versions  # heavy imports once configs are valid
        from gptscale.model.fp8 import check_fp8
        from gptscale.model.spec import resolve_backend
        from gptscale.parallel.groups import choose_device

        for _, _, cfg in configs:
            device = choose_device(cfg.train.device)
            check_fp8(cfg.model, cfg.train, resolve_backend(cfg.model, on_gpu=device.type == "cuda"), device)
    except ConfigError as error:
        print(error, file=sys.stderr)
        sys.exit(2)

    first = None
    for label, overrides, cfg in configs:
        result = measure(cfg, label)
        if rank != 0:
            continue
        if first is None:
            first = result
            device = device_name(choose_device(cfg.train.device))
            print(
                f"# {datetime.date.today()} | {device} | "
                + " ".join(f"{name} {version}" for name, version in versions().items())
            )
            print(HEADER)
        print(format_row(result, first), flush=True)
        if result.profile:
            print(f"# torch.profiler, {cfg.bench.profile_steps} steps of {result.label}:\n{result.profile}", flush=True)
        if cfg.bench.host_syncs:
            for what, found in (
                ("one step", result.host_syncs),
                ("one iteration of the training loop that does not log", result.loop_host_syncs),
            ):
                print(f"# host syncs in {what} of {result.label}: {sum(found.values())}", flush=True)
                for site, count in sorted(found.items(), key=lambda item: -item[1]):
                    print(f"#   {count:>4}  {site}")
        if cfg.bench.output:
            record = {
                "date": str(datetime.date.today()),
                "device": device,
                "versions": versions(),
                "overrides": overrides,
                **result.to_json(),
            }
            with open(cfg.bench.output, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
