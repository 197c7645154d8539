"""gptscale-plan: stages composed as megatron-core builds them, the CLI's tables and JSON, the search's
refusals in config.check's own words. Exactness against real runs: tests/dist/test_plan_states.py."""

import json
import os
import subprocess
import sys

import pytest

from gptscale.config import ConfigError, check, load_config
from gptscale.plan.cluster import cluster_of
from gptscale.plan.search import with_settings
from gptscale.plan.step_time import estimate
from tests.helpers import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def test_composed_stages_equal_megatron_stage_builds():
    proc = _run(["tests/unit/run_plan_stages.py"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 + 4 + 2 + 2
    assert all(row["numel"] > 0 for row in rows)
    assert [row for row in rows if not row["equal"]] == []


def test_plan_json_of_one_layout():
    proc = _run(
        [
            "-m",
            "gptscale.plan",
            "model=llama-tiny",
            "cluster.gpus_per_node=4",
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.zero=1",
            "train.seq_len=64",
            "--json",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["refused"] is None and out["layout"]["dp"] == 1
    assert {rank["pp_rank"] for rank in out["ranks"]} == {0, 1}
    for rank in out["ranks"]:
        assert rank["total_bytes"] > rank["parameters_bytes"] + rank["activations_peak_bytes"] > 0
    kinds = {c["kind"]: c for c in out["step"]["collectives"]}
    assert kinds["TP all-reduce"]["bytes_per_step"] > 0 and kinds["PP send/recv"]["link"] == "intra-node"
    assert out["tokens_per_s"] > 0


def test_search_ranks_fitting_layouts_and_refuses_with_check_messages():
    overrides = ["model=gpt2-tiny", "cluster.gpus_per_node=4", "train.seq_len=64", "parallel.global_batch=8"]
    proc = _run(["-m", "gptscale.plan", *overrides, "--search", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    layouts = json.loads(proc.stdout)["layouts"]
    fitting = [r for r in layouts if r["refused"] is None]
    speeds = [r["tokens_per_s"] for r in fitting]
    assert len(fitting) > 5 and speeds == sorted(speeds, reverse=True)
    context_parallel = [r for r in fitting if r["settings"]["cp"] > 1]
    assert context_parallel and all(r["layout"]["cp"] == r["settings"]["cp"] for r in context_parallel)
    assert any(c["kind"].startswith("CP ") for c in context_parallel[0]["step"]["collectives"])
    cfg = load_config(overrides)
    refused = [r for r in layouts if r["refused"] and not r["refused"].startswith("does not fit")]
    assert refused
    for r in refused[:40]:
        with pytest.raises(ConfigError) as error:
            check(with_settings(cfg, r["settings"]), 4)
        assert str(error.value) == r["refused"]


def test_unknown_gpu_is_named():
    cfg = load_config(["cluster.gpu=h900"])
    with pytest.raises(ValueError, match="cluster.gpu='h900'"):
        cluster_of(cfg.cluster)


def test_plan_header_names_what_a_step_trains():
    """A named model plans with its paper's recipe (sequence length, batch), and the header says so."""
    proc = _run(["-m", "gptscale.plan", "model=llama-70b", "cluster.nodes=8", "parallel.tp=8", "parallel.pp=4"])
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: the layout does not fit
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in proc.stderr
    assert proc.stdout.splitlines()[0] == (
        "llama-70b: seq_len 4096, global batch 1024 sequences (4,194,304 tokens), bf16, activation checkpointing none"
    )


def _links(overrides: list[str]) -> dict[str, str]:
    """Each collective's link in the step-time estimate of a layout (analytic: no model is built)."""
    cfg = load_config(overrides)
    cluster = cluster_of(cfg.cluster)
    step = estimate(cfg, check(cfg, cluster.world_size), cluster, cfg.model.vocab_size, rank_numel=10**9)
    return {c.kind.split()[0]: c.link for c in step.collectives}


def test_groups_are_priced_by_the_nodes_their_ranks_lie_on():
    """Megatron-core puts tensor parallelism innermost: tp=8 is one 8-GPU node, the data and pipeline groups
    around it cross nodes; a group crosses nodes only when its block of ranks outgrows or straddles a node."""
    gpt3 = [
        "model=gpt3-175b",
        "cluster.nodes=8",
        "cluster.gpus_per_node=8",
        "cluster.gpu=a100",
        "parallel.sp=true",
        "parallel.global_batch=1536",
        "parallel.micro_batch=1",
    ]
    assert _links([*gpt3, "parallel.tp=8", "parallel.pp=8"]) == {"TP": "intra-node", "PP": "inter-node"}
    assert _links([*gpt3, "parallel.tp=8", "parallel.pp=4", "parallel.zero=1"]) == {
        "TP": "intra-node",
        "DP": "inter-node",
        "PP": "inter-node",
    }
    assert _links([*gpt3, "parallel.tp=4", "parallel.pp=8", "parallel.zero=1"]) == {
        "TP": "intra-node",
        "DP": "intra-node",
        "PP": "inter-node",
    }
    straddling = [
        "model=gpt2-tiny",
        "cluster.nodes=2",
        "cluster.gpus_per_node=6",
        "parallel.global_batch=12",
        "parallel.micro_batch=1",
        "parallel.pp=3",
        "parallel.zero=1",
        "model.num_layers=6",
    ]
    assert _links([*straddling, "parallel.tp=2"]) == {"TP": "intra-node", "DP": "inter-node", "PP": "inter-node"}
    assert _links([*straddling, "parallel.tp=4", "parallel.pp=1", "model.num_attention_heads=4"])["TP"] == "inter-node"


def test_step_time_is_within_the_stated_factor_of_published_megatron_runs():
    """docs/planning.md: Narayanan et al. 2021's table 1, predicted within a factor of 1.3 (at tp=8 the
    planner once priced the node-local tensor-parallel group between nodes: 0.34 and 0.45 of published)."""
    proc = _run(["tools/plan_vs_published.py", "1.7", "18.4", "145.6"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = {
        row.split("|")[1].strip(): float(row.split("|")[-2])
        for row in proc.stdout.splitlines()
        if row.startswith("| ") and row.split("|")[1].strip().endswith("B")
    }
    assert set(ratios) == {"1.7B", "18.4B", "145.6B"}
    assert all(1 / 1.3 <= ratio <= 1.3 for ratio in ratios.values()), ratios
