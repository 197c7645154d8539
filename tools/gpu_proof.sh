#!/usr/bin/env bash
# The GPU proof kit: everything a first GPU run must show, in one device call of about 8 minutes, the most
# important figures first. Each stage has its own time budget (cut to what is left of GPU_PROOF_TOTAL, default
# 540 s), so one slow stage cannot eat the rest; a failed stage is recorded and the next one runs.
#
#   bash tools/gpu_proof.sh                  # on the device, with wheels/gpu carried (tools/gpu_wheels.sh build)
#   GPU_PROOF_DRY=1 bash tools/gpu_proof.sh  # the same stages on CPU, tiny shapes and few steps (tests/e2e)
#
# Stages: setup (install the wheelhouse), versions, train (gptscale-train, 20 steps of gpt2-124m bf16 on the
# embedded corpus: must finish and the loss fall), ckpt (save after 2 steps, resume to 4), speed-MODEL for
# gpt2-350m, gpt2-774m and llama-1b (gptscale-bench bf16 ZeRO-1 T=1024 beside tools/gpt_baseline.py),
# fp8 (torchao float8 against bf16, both compiled), plan (the planner's peak memory against the measured one).
# $OUT (default runs/gpu_proof) gets at most 6 files, each written as its stage ends: stages.txt (name, exit
# status, seconds), rows.jsonl (one JSON line per speed/fp8 config), train-metrics.jsonl, plan.txt,
# proof.log (all output) and summary.txt. Run directories go to $GPU_PROOF_WORK (default /tmp/gpu_proof).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu_proof}"
WORK="${GPU_PROOF_WORK:-/tmp/gpu_proof}"
DRY="${GPU_PROOF_DRY:-0}"
mkdir -p "$OUT" "$WORK"

if [ "$DRY" = 1 ]; then
  TRAIN_MODEL=gpt2-tiny SPEED_MODELS="gpt2-tiny llama-tiny" FP8_MODEL=gpt2-tiny
  SHAPE=(train.seq_len=64 parallel.micro_batch=2 parallel.global_batch=2)
  TRAIN=(data.embedded_max_bytes=200000) BENCH=(bench.warmup=1 bench.steps=2 bench.repeats=1)
  BASELINE=(--seq-len 64 --micro-batch 2 --warmup 1 --steps 2 --no-compile)
  FP8=(train.fp8_emulate=true) COMPILE=false
  PLAN=(PLAN_MODELS=gpt2-tiny PLAN_SEQ=64 PLAN_STEPS=2)
  # Not in the wheelhouse nor the image: shadowed by packages that refuse to import, as they would be absent there.
  for absent in wandb submitit gguf; do
    mkdir -p "$WORK/absent/$absent"
    echo "raise ImportError('$absent is not on the GPU device (tools/gpu_wheels.txt)')" >"$WORK/absent/$absent/__init__.py"
  done
  export PYTHONPATH="$WORK/absent:$PYTHONPATH"
else
  TRAIN_MODEL=gpt2-124m SPEED_MODELS="gpt2-350m gpt2-774m llama-1b" FP8_MODEL=gpt2-774m
  SHAPE=(train.seq_len=1024 parallel.micro_batch=8 parallel.global_batch=8)
  TRAIN=() BENCH=(bench.warmup=3 bench.steps=5 bench.repeats=2)  # 10 timed steps, a spread of two windows
  BASELINE=(--seq-len 1024 --micro-batch 8 --warmup 3 --steps 10)
  FP8=() COMPILE=true
  PLAN=(PLAN_MODELS=gpt2-774m)
fi
RUN=(train.precision=bf16 parallel.zero=1 "${SHAPE[@]}")

train() {  # gptscale-train's entry point, from the working tree
  "$PYTHON" -m gptscale.train model="$TRAIN_MODEL" "${RUN[@]}" "${TRAIN[@]}" train.eval_interval=0 \
    logging.wandb.mode=disabled "$@"
}

losses() {  # first and last logged loss of a run; fails unless the loss fell
  "$PYTHON" - "$1" <<'EOF'
import json, sys
losses = [r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/metrics.jsonl")) if "loss" in r]
print(f"loss {losses[0]:.3f} at the first of {len(losses)} logs, {losses[-1]:.3f} at the last")
sys.exit(0 if len(losses) > 1 and losses[-1] < losses[0] else "the loss did not fall")
EOF
}

stage_setup() {
  if [ "$DRY" = 1 ]; then  # the wheels are for the device's Python 3.12: list them, install nothing
    ls "${GPU_WHEELS:-wheels/gpu}"/*.whl && echo "dry run: $(du -ch "${GPU_WHEELS:-wheels/gpu}"/*.whl | tail -1)"
  else
    bash tools/gpu_wheels.sh setup
  fi
}

stage_versions() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("megatron-core", "deepspeed", "hydra-core", "omegaconf", "torchao", "transformer-engine", "pydantic"):
    try: print(name, md.version(name))
    except md.PackageNotFoundError: print(name, "absent")
EOF
}

stage_train() {
  rm -rf "$WORK/train"
  train run_dir="$WORK/train" train.steps=20 train.log_interval=2 optim.warmup_steps=4 \
    checkpoint.save_final=false || return
  cp "$WORK/train/metrics.jsonl" "$OUT/train-metrics.jsonl"
  losses "$WORK/train"
}

stage_ckpt() {
  rm -rf "$WORK/ckpt"
  train run_dir="$WORK/ckpt" train.steps=2 train.log_interval=1 checkpoint.save_final=true || return
  train run_dir="$WORK/ckpt" train.steps=4 train.log_interval=1 optim.on_new_steps=extend 2>&1 \
    | tee "$WORK/ckpt/resume.log" || return
  grep -q "resumed from .*(step 2," "$WORK/ckpt/resume.log" || { echo "the second run did not resume at step 2"; return 1; }
}

stage_speed() {  # gptscale's stack and the plain baseline, one preset, same shape, same device
  "$PYTHON" -m gptscale.bench model="$1" "${RUN[@]}" "${BENCH[@]}" "bench.output=$OUT/rows.jsonl" \
    "run_dir=$WORK/bench" || return
  "$PYTHON" tools/gpt_baseline.py model="$1" "${BASELINE[@]}" --output "$OUT/rows.jsonl"
}

stage_fp8() {
  "$PYTHON" -m gptscale.bench model="$FP8_MODEL" "${RUN[@]}" "${BENCH[@]}" "bench.output=$OUT/rows.jsonl" \
    "run_dir=$WORK/bench" train.compile=$COMPILE model.backend=local \
    --compare "" "train.fp8=hybrid ${FP8[*]}"
}

stage_plan() {
  rm -f "$WORK/plan.txt"
  env OUT="$WORK" "${PLAN[@]}" bash tools/gpu_bench.sh plan || return
  cp "$WORK/plan.txt" "$OUT/plan.txt"
  [ -s "$OUT/plan.txt" ] || { echo "no plan: lines"; return 1; }
}

if [ "${1:-}" = stage ]; then  # one stage, run under its own timeout by the loop below
  shift; name="$1"; shift; "stage_$name" "$@"; exit
fi

TOTAL="${GPU_PROOF_TOTAL:-540}"
: >"$OUT/stages.txt"
run_stage() {  # name budget [args]: the stage under min(budget, time left), its line in stages.txt
  local name="$1" budget="$2" label="$1${3:+-$3}" start=$SECONDS left rc
  left=$((TOTAL - SECONDS))
  [ "$left" -lt "$budget" ] && budget="$left"
  if [ "$budget" -le 5 ]; then echo "$label skipped 0 s (no time left)" >>"$OUT/stages.txt"; return; fi
  echo "=== $label (budget ${budget} s)"
  timeout --kill-after=10 "$budget" bash "$0" stage "$name" "${@:3}"
  rc=$?
  [ "$rc" = 124 ] && rc="timeout"
  echo "$label rc=$rc $((SECONDS - start)) s" | tee -a "$OUT/stages.txt"
}

{
  run_stage setup 60
  run_stage versions 30
  run_stage train 100
  run_stage ckpt 90
  for model in $SPEED_MODELS; do run_stage speed 90 "$model"; done
  run_stage fp8 150
  run_stage plan 90
  "$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
out = sys.argv[1]
print(open(f"{out}/stages.txt").read(), end="")
rows = [json.loads(line) for line in open(f"{out}/rows.jsonl")] if __import__("os").path.exists(f"{out}/rows.jsonl") else []
print(f"{'config':<58} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} {'vs baseline':>11}")
baseline = {r["model"]: r for r in rows if "model" in r}
for r in rows:
    if "model" in r:
        model, label = r["model"], r["label"]
    else:  # a gptscale-bench record: its preset, and what its --compare variant adds
        model = next(o.split("=", 1)[1] for o in r["overrides"] if o.startswith("model="))
        extra = [o for o in r["overrides"] if o.startswith(("train.fp8=", "train.compile=true"))]
        label = " ".join([f"gptscale {model}", *extra])
    base = baseline.get(model)
    ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(f"{label[:58]:<58} {r['tokens_per_s']:>10,.0f} {mfu:>6} {r['peak_memory_gib'] or 0:>8.2f} {ratio:>11}")
EOF
} 2>&1 | tee "$OUT/proof.log"
