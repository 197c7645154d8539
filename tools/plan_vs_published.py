"""gptscale-plan's step time beside the throughputs Narayanan et al. 2021 measured ("Efficient Large-Scale
Language Model Training on GPU Clusters Using Megatron-LM", arXiv 2104.04473, table 1): GPT models of 1.7B to
1T parameters on Selene, nodes of 8 80-GB A100s on NVLink with one 200 Gb/s HDR InfiniBand port per GPU.

Each row is planned as the paper ran it: vocabulary 51,200, 2048 tokens, mixed precision, full activation
recomputation, its tensor- and pipeline-parallel sizes and batch, data parallelism over the other GPUs,
micro-batch 1 and plain 1F1B (table 1 gives neither). The paper counts 96 B s l h^2 (1 + s/6h + V/16lh)
flops per step (recomputation included), so its throughput in tokens/s is the achieved TFLOP/s per GPU
times the GPUs over that count per token. Prints one markdown row per model: docs/planning.md.

    python tools/plan_vs_published.py              # every row (minutes: each plan builds its stages on meta)
    python tools/plan_vs_published.py 1.7 145.6    # the rows of these sizes (billions of parameters)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptscale.config import load_config  # noqa: E402
from gptscale.plan.cluster import cluster_of  # noqa: E402
from gptscale.plan.search import plan  # noqa: E402

VOCAB, SEQ = 51200, 2048
# billions of parameters, heads, hidden size, layers, tp, pp, GPUs, batch, achieved TFLOP/s per GPU
TABLE_1 = [
    ("1.7", 24, 2304, 24, 1, 1, 32, 512, 137),
    ("3.6", 32, 3072, 30, 2, 1, 64, 512, 138),
    ("7.5", 32, 4096, 36, 4, 1, 128, 512, 142),
    ("18.4", 48, 6144, 40, 8, 1, 256, 1024, 135),
    ("39.1", 64, 8192, 48, 8, 2, 512, 1536, 138),
    ("76.1", 80, 10240, 60, 8, 4, 1024, 1792, 140),
    ("145.6", 96, 12288, 80, 8, 8, 1536, 2304, 148),
    ("310.1", 128, 16384, 96, 8, 16, 1920, 2160, 155),
    ("529.6", 128, 20480, 105, 8, 35, 2520, 2520, 163),
    ("1008.0", 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


def overrides(heads: int, hidden: int, layers: int, tp: int, pp: int, gpus: int, batch: int) -> list[str]:
    """gptscale-plan's overrides for one row (a GPT-3 preset reshaped)."""
    return [
        "model=gpt3-175b",
        f"model.num_layers={layers}",
        f"model.hidden_size={hidden}",
        f"model.num_attention_heads={heads}",
        f"model.ffn_hidden_size={4 * hidden}",
        f"model.vocab_size={VOCAB}",
        f"train.seq_len={SEQ}",
        "train.precision=bf16",
        "train.activation_checkpointing=full",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.global_batch={batch}",
        "parallel.micro_batch=1",
        "cluster.gpu=a100",
        "cluster.gpus_per_node=8",
        f"cluster.nodes={gpus // 8}",
    ]


def paper_flops_per_token(hidden: int, layers: int) -> float:
    """The paper's equation 3 per token: 96 l h^2 (1 + s/6h + V/16lh)."""
    return 96 * layers * hidden**2 * (1 + SEQ / (6 * hidden) + VOCAB / (16 * layers * hidden))


def main(sizes: list[str]) -> int:
    print("| model | tp | pp | dp | GPUs | batch | published TFLOP/s per GPU | predicted | predicted / published |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, heads, hidden, layers, tp, pp, gpus, batch, published in TABLE_1:
        if sizes and size not in sizes:
            continue
        keys = overrides(heads, hidden, layers, tp, pp, gpus, batch)
        cfg = load_config(keys)
        planned = plan(cfg, cluster_of(cfg.cluster), VOCAB)
        if planned.layout is None:
            print(f"| {size}B | refused: {planned.refused} |", file=sys.stderr)
            return 1
        predicted = planned.tokens_per_s * paper_flops_per_token(hidden, layers) / gpus / 1e12
        print(
            f"| {size}B | {tp} | {pp} | {planned.layout.dp} | {gpus} | {batch} | {published} | {predicted:.0f} | "
            f"{predicted / published:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
