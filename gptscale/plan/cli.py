"""``gptscale-plan``: memory per rank and step time of a layout on a cluster, before the cluster runs it.

    gptscale-plan model=llama-7b cluster.nodes=2 cluster.gpus_per_node=8 cluster.gpu=h100 parallel.tp=4 ...
    gptscale-plan model=llama-70b cluster.nodes=8 cluster.gpu=h100 train.seq_len=4096 \\
        parallel.global_batch=512 train.precision=bf16 --search
    gptscale-plan model=gpt2-774m cluster.gpus_per_node=2 --json

Overrides are the training config's (model=, parallel.*, train.*) plus ``cluster.*``. The world size is
cluster.nodes * cluster.gpus_per_node. Vocabulary: model.vocab_size (training takes its tokenizer's).
Assumptions (bandwidths, efficiencies, allocator margin): docs/planning.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict

from gptscale.config import Config, load_config
from gptscale.config.layout import describe
from gptscale.plan.cluster import Cluster, cluster_of
from gptscale.plan.memory import ALLOCATOR_MARGIN
from gptscale.plan.search import Planned, plan, search
from gptscale.plan.step_time import BANDWIDTH_EFFICIENCY, COMPUTE_EFFICIENCY

GiB = 2**30


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gptscale-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: model=, cluster.*, parallel.*, train.*")
    parser.add_argument("--search", action="store_true", help="rank every layout of the cluster by tokens/s")
    parser.add_argument("--top", type=int, default=20, help="fitting layouts shown by --search (default 20)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser.parse_args(argv)


def _layout_text(settings: dict) -> str:
    s = settings
    recompute = getattr(s["activation_checkpointing"], "value", s["activation_checkpointing"])
    return (
        f"{describe(s['tp'], s['pp'], s['vpp'], s['zero'], sp=s['sp'], ep=s['ep'], cp=s['cp'], micro_batch=s['micro_batch'])} "
        f"recompute={recompute}"
    )


def assumptions(cluster: Cluster) -> str:
    gpu = cluster.gpu
    return (
        f"assumptions: {gpu.name}, {gpu.memory_bytes / GiB:.0f} GiB; links {gpu.intra_node_gbps:.0f} GB/s "
        f"in a node, {gpu.inter_node_gbps:.1f} GB/s between nodes per GPU, at {BANDWIDTH_EFFICIENCY:.0%}; "
        f"matmuls at {COMPUTE_EFFICIENCY:.0%} of peak; no overlap of communication; allocator margin "
        f"{ALLOCATOR_MARGIN:.0%} (docs/planning.md)"
    )


def job_text(cfg: Config) -> str:
    """What a step trains: the plan's figures depend on it as much as on the layout."""
    train = cfg.train
    batch = cfg.parallel.global_batch
    return (
        f"{cfg.model.name}: seq_len {train.seq_len}, global batch {batch} sequences "
        f"({batch * train.seq_len:,} tokens), {train.precision.value}, activation checkpointing "
        f"{train.activation_checkpointing.value}"
    )


def format_plan(planned: Planned, cluster: Cluster, cfg: Config) -> str:
    lines = [
        job_text(cfg),
        f"layout: {_layout_text(planned.settings)} on {cluster.nodes} x {cluster.gpus_per_node} "
        f"{cluster.gpu.name} ({cluster.world_size} ranks)",
    ]
    if planned.layout is None:
        return "\n".join([*lines, f"refused: {planned.refused}"])
    layout = planned.layout
    lines.append(f"  dp {layout.dp}, {layout.num_microbatches} micro-batches of {layout.micro_batch} per step")
    lines.append(
        f"{'stage':>5} {'dp rank':>7} {'params':>8} {'grads':>8} {'optim':>8} {'act/mb':>8} "
        f"{'act peak':>8} {'margin':>8} {'total GiB':>9}"
    )
    for rank in planned.ranks:
        states = rank.states
        lines.append(
            f"{rank.pp_rank:>5} {rank.dp_rank:>7} {states.parameters / GiB:>8.2f} {states.gradients / GiB:>8.2f} "
            f"{states.optimizer / GiB:>8.2f} {rank.activations_one / GiB:>8.2f} "
            f"{rank.activations_peak / GiB:>8.2f} {rank.margin / GiB:>8.2f} {rank.total / GiB:>9.2f}"
        )
    step = planned.step
    lines.append(f"step {step.total_s:.3f} s: compute {step.compute_s:.3f} s, pipeline bubble {step.bubble_s:.3f} s")
    for c in step.collectives:
        lines.append(f"  {c.kind:<46} {c.link:<10} {c.bytes_per_step / 1e9:>9.3f} GB/rank {c.seconds * 1e3:>9.1f} ms")
    lines.append(
        f"predicted {planned.tokens_per_s:,.0f} tokens/s; " + ("fits" if planned.refused is None else planned.refused)
    )
    lines.append(assumptions(cluster))
    return "\n".join(lines)


def format_search(results: list[Planned], cluster: Cluster, top: int, cfg: Config) -> str:
    fitting = [r for r in results if r.refused is None]
    lines = [
        job_text(cfg),
        f"{len(results)} layouts on {cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu.name}: "
        f"{len(fitting)} fit, best {min(top, len(fitting))} by predicted tokens/s",
        f"{'#':>3} {'layout':<46} {'dp':>4} {'peak GiB':>8} {'step s':>8} {'tokens/s':>12}",
    ]
    for i, r in enumerate(fitting[:top], 1):
        lines.append(
            f"{i:>3} {_layout_text(r.settings):<46} {r.layout.dp:>4} {r.fullest.total / GiB:>8.1f} "
            f"{r.step.total_s:>8.3f} {r.tokens_per_s:>12,.0f}"
        )
    reasons: dict[str, list[Planned]] = {}
    for r in results:
        if r.refused is not None:
            reasons.setdefault(re.sub(r"[\d.]+", "N", _reason(r.refused)), []).append(r)
    if reasons:
        lines.append(
            f"refused ({sum(len(v) for v in reasons.values())}), by reason (config.check's words; --json "
            "lists every layout), with one example:"
        )
        for refused in sorted(reasons.values(), key=len, reverse=True):
            lines.append(f"  {len(refused):>5} x {_reason(refused[0].refused)}")
            lines.append(f"          e.g. {_layout_text(refused[0].settings)}")
    lines.append(assumptions(cluster))
    return "\n".join(lines)


def _reason(message: str) -> str:
    """The first problem config.check names (or the memory verdict)."""
    return message.split("\n  - ")[1] if "\n  - " in message else message


def to_json(planned: Planned) -> dict:
    out = {"settings": {k: getattr(v, "value", v) for k, v in planned.settings.items()}, "refused": planned.refused}
    if planned.layout is not None:
        out["layout"] = asdict(planned.layout)
        out["ranks"] = [
            {
                "pp_rank": r.pp_rank,
                "dp_rank": r.dp_rank,
                **{f"{k}_bytes": v for k, v in asdict(r.states).items()},
                "activations_per_microbatch_bytes": r.activations_one,
                "activations_peak_bytes": r.activations_peak,
                "margin_bytes": r.margin,
                "total_bytes": r.total,
            }
            for r in planned.ranks
        ]
        out["step"] = {
            "total_s": planned.step.total_s,
            "compute_s": planned.step.compute_s,
            "bubble_s": planned.step.bubble_s,
            "collectives": [asdict(c) for c in planned.step.collectives],
        }
        out["tokens_per_s"] = planned.tokens_per_s
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.overrides)
        cluster = cluster_of(cfg.cluster)
    except ValueError as error:
        print(f"gptscale-plan: {error}", file=sys.stderr)
        return 2
    vocab = cfg.model.vocab_size
    if args.search:
        results = search(cfg, cluster, vocab)
        if args.json:
            print(json.dumps({"cluster": asdict(cluster), "layouts": [to_json(r) for r in results]}, indent=1))
        else:
            print(format_search(results, cluster, args.top, cfg))
        return 0 if any(r.refused is None for r in results) else 1
    planned = plan(cfg, cluster, vocab)
    print(
        json.dumps({"cluster": asdict(cluster), **to_json(planned)}, indent=1)
        if args.json
        else format_plan(planned, cluster, cfg)
    )
    return 0 if planned.refused is None else 1


if __name__ == "__main__":
    sys.exit(main())
