#!/usr/bin/env bash
# The speed goals of issue 7 on one GPU, in stages that each fit a 10-minute device command.
#
#   bash tools/gpu_bench.sh env        # what the machine has (run first, ~1 min)
#   bash tools/gpu_bench.sh bf16       # goal 1: gpt2-350m and gpt2-774m at T=1024, bf16 (~8 min)
#   bash tools/gpu_bench.sh llama      # goal 1: llama-1b at T=1024, bf16, eager and compiled layers (~5 min)
#   bash tools/gpu_bench.sh fp8 gpt2-774m   # goal 2: bf16 vs torchao float8, eager and compiled (TE too where
#   bash tools/gpu_bench.sh fp8 llama-1b    #   present) (~6 min each)
#   bash tools/gpu_bench.sh memory     # goal 3: activation checkpointing trade-off, largest model with ZeRO-3 (~8 min)
#   bash tools/gpu_bench.sh curve      # goal 2: 300-step loss curves, bf16 vs fp8 (~8 min)
#   bash tools/gpu_bench.sh profile    # torch.profiler top kernels of a gpt2-774m step (~3 min)
#   bash tools/gpu_bench.sh plan       # issue 14: predicted vs measured peak, gpt2-774m and llama-1b, 3 layouts (~5 min)
#
# Rows go to stdout, JSON lines to $OUT/bench.jsonl (OUT defaults to runs/gpu_bench). Baseline measured on
# one H100 80GB on 2026-11-22 (torch 2.11 cu130), for comparison:
#   nanoGPT (torch.compile + SDPA flash, bf16, T=1024, random tokens):
#     gpt2-124m 422k tokens/s (36.5 % MFU), gpt2-350m 160k (39.1 %), gpt2-774m 79.3k (41.7 %)
#   megatron-core GPTModel, local spec, eager, bf16 autocast: 106k / 43.8k / 23.4k (11.6 / 12.1 / 13.2 % MFU)
#   same with SDPA core attention: 118.5k at 350m (32.7 %, 14.5 GiB), 65.0k at 774m (36.7 %, 26 GiB)
#   + DeepSpeed ZeRO-1 bf16 clipping: 59.1k at 350m, 42.5k at 774m (torch AdamW)
# The GPU machine reaches no package registry: build the wheelhouse here (bash tools/gpu_wheels.sh build), carry
# wheels/gpu, and start the command with `bash tools/gpu_wheels.sh setup &&`. tools/gpu_proof.sh does all of it.
# Goals: gpt2-350m >= 190k tokens/s, gpt2-774m >= 95k, llama-1b >= 50 % MFU; FP8 >= 1.5x those for gpt2-774m and
# llama-1b with a 300-step loss curve within 1 % of bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/gpu_bench}"
PYTHON="${PYTHON:-python3}"  # the device image has python3 only
mkdir -p "$OUT"
STAGE="${1:?stage: env | bf16 | llama | fp8 MODEL | memory | curve | profile | plan}"

# bf16 weights, ZeRO-1 (DeepSpeed's BF16 optimizer: fp32 master weights and gradient sums), T=1024, no accumulation.
COMMON=(train.precision=bf16 parallel.zero=1 train.seq_len=1024 bench.warmup=5 bench.steps=20 "bench.output=$OUT/bench.jsonl")

bench() { "$PYTHON" -m gptscale.bench "${COMMON[@]}" "$@"; }

case "$STAGE" in
env)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PYTHON" - <<'EOF'
import importlib.metadata as md, os, torch
for p in ("torch", "megatron-core", "deepspeed", "hydra-core", "torchao", "transformer-engine", "transformer_engine_torch", "apex", "flash-attn"):
    try: print(p, md.version(p))
    except md.PackageNotFoundError: print(p, "absent")
print("cuda", torch.version.cuda, "capability", torch.cuda.get_device_capability(), "TORCH_CUDA_ARCH_LIST",
      os.environ.get("TORCH_CUDA_ARCH_LIST"))
print("flash SDPA", torch.backends.cuda.flash_sdp_enabled())
EOF
  # torchao's float8 needs FP8 tensor cores: an 8192^3 _scaled_mm next to a bf16 matmul shows what they give.
  "$PYTHON" - <<'EOF'
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for name, fn in {"bf16": lambda: a @ a,
                 "fp8": lambda: torch._scaled_mm(a.to(torch.float8_e4m3fn), a.to(torch.float8_e4m3fn).t().contiguous().t(),
                                                 scale_a=torch.ones((), device="cuda"), scale_b=torch.ones((), device="cuda"),
                                                 out_dtype=torch.bfloat16)}.items():
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): fn()
    torch.cuda.synchronize(); print(f"8192^3 {name} matmul: {20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s")
EOF
  ;;
bf16)
  bench model=gpt2-350m --compare "parallel.micro_batch=8 parallel.global_batch=8" \
    "parallel.micro_batch=16 parallel.global_batch=16" "parallel.micro_batch=16 parallel.global_batch=16 model.attention=unfused" \
    "parallel.micro_batch=16 parallel.global_batch=16 parallel.zero=0"
  bench model=gpt2-774m --compare "parallel.micro_batch=8 parallel.global_batch=8" "parallel.micro_batch=16 parallel.global_batch=16" \
    "parallel.micro_batch=16 parallel.global_batch=16 train.compile=true"
  ;;
llama)
  bench model=llama-1b --compare "parallel.micro_batch=8 parallel.global_batch=8" "parallel.micro_batch=16 parallel.global_batch=16" \
    "parallel.micro_batch=16 parallel.global_batch=16 train.compile=true"
  ;;
fp8)
  model="${2:?fp8 needs a model: gpt2-774m or llama-1b}"
  variants=("" "train.compile=true" "train.fp8=hybrid model.backend=local" "train.fp8=hybrid model.backend=local train.compile=true")
  "$PYTHON" -c "import transformer_engine" 2>/dev/null && variants+=("train.fp8=hybrid model.backend=te")
  bench model="$model" parallel.micro_batch=8 parallel.global_batch=8 --compare "${variants[@]}"
  ;;
memory)
  bench model=gpt2-774m parallel.micro_batch=16 parallel.global_batch=16 bench.steps=10 --compare \
    "train.activation_checkpointing=none" "train.activation_checkpointing=selective" "train.activation_checkpointing=full"
  # ZeRO-3 on one GPU still holds 16 bytes per parameter (bf16 weights, fp32 master, two Adam moments): ~4.5B
  # parameters fit 80 GB before activations. Larger models need optimizer offload, which gptscale does not expose.
  bench model=gpt3-2.7b parallel.zero=3 parallel.micro_batch=4 parallel.global_batch=4 bench.steps=5 \
    --compare "train.activation_checkpointing=full" "train.activation_checkpointing=none"
  ;;
curve)
  # 300 steps of gpt2-124m on the embedded corpus (byte tokens), bf16 and FP8; compare metrics.jsonl losses.
  for variant in bf16 fp8; do
    extra=(); [ "$variant" = fp8 ] && extra=(train.fp8=hybrid)
    "$PYTHON" -m gptscale.train model=gpt2-124m train.precision=bf16 parallel.zero=1 train.seq_len=1024 \
      parallel.micro_batch=16 parallel.global_batch=32 train.steps=300 train.log_interval=10 train.eval_interval=100 \
      optim.warmup_steps=30 checkpoint.save_final=false "run_dir=$OUT/curve-$variant" "${extra[@]}"
  done
  "$PYTHON" - "$OUT" <<'EOF'
import json, sys
def losses(v): return [r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/curve-{v}/metrics.jsonl")) if "loss" in r]
bf16, fp8 = losses("bf16"), losses("fp8")
worst = max(abs(a - b) / b for a, b in zip(fp8, bf16))
print("step bf16 fp8"); [print((i + 1) * 10, f"{b:.4f} {a:.4f}") for i, (a, b) in enumerate(zip(fp8, bf16))]
print(f"largest relative gap {worst:.2%} (goal: within 1 %)")
EOF
  ;;
profile)
  bench model=gpt2-774m parallel.micro_batch=8 parallel.global_batch=8 bench.steps=5 bench.profile_steps=2 bench.host_syncs=true
  ;;
plan)
  # The trainer's "plan:" line: the plan's peak (model states + in-flight activations + allocator margin)
  # beside torch.cuda.max_memory_allocated. PLAN_MODELS, PLAN_SEQ and PLAN_STEPS shrink it for a CPU rehearsal,
  # where the line compares model states only.
  layouts=("parallel.zero=1 parallel.micro_batch=8 parallel.global_batch=8"
           "parallel.zero=1 parallel.micro_batch=16 parallel.global_batch=16 train.activation_checkpointing=full"
           "parallel.zero=3 parallel.micro_batch=8 parallel.global_batch=8")
  for model in ${PLAN_MODELS:-gpt2-774m llama-1b}; do
    for layout in "${layouts[@]}"; do
      # shellcheck disable=SC2086  # a layout is several overrides
      "$PYTHON" -m gptscale.train model="$model" train.precision=bf16 train.seq_len="${PLAN_SEQ:-1024}" \
        train.steps="${PLAN_STEPS:-10}" train.log_interval=5 checkpoint.save_final=false "run_dir=$OUT/plan" \
        $layout 2>&1 | sed -n "s|^.*\(plan: rank 0 .*\)|$model $layout: \1|p" | tee -a "$OUT/plan.txt"
      rm -rf "$OUT/plan"
    done
  done
  ;;
*)
  echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
