#!/usr/bin/env bash
# Start gptscale on this node: one torchrun agent starting one rank per GPU; nodes meet by c10d rendezvous.
#
#   launch/torchrun.sh [options] [--] [hydra overrides ...]
#
#   --nnodes N          nodes in the job                        (env NNODES, default 1)
#   --node-rank R       this node's index; node 0 hosts it      (env NODE_RANK, default 0)
#   --nproc-per-node P  ranks on this node                      (env NPROC_PER_NODE, default: GPUs, else 1)
#   --master-addr HOST  node 0's address (required for N > 1)   (env MASTER_ADDR)
#   --master-port PORT  the rendezvous port on node 0           (env MASTER_PORT, default 29500)
#   --rdzv-id ID        the same on every node of one job       (env RDZV_ID, default gptscale)
#   --rdzv-timeout S    seconds to wait for every node to join  (env GPTSCALE_RDZV_TIMEOUT, launch/env.sh)
#   --max-restarts N    in-job restarts after a failure         (env GPTSCALE_MAX_RESTARTS, launch/env.sh)
#
# After a failure (a rank that dies, or hangs: docs/faults.md) torchrun restarts every rank, up to N times,
# and they resume from the newest complete checkpoint; restarts in a row without a new checkpoint end the
# launch with exit code 76 (fault.max_restarts_without_progress).
#
# One node:  launch/torchrun.sh --nproc-per-node 8 model=gpt2-124m parallel.tp=2
# Two nodes: launch/torchrun.sh --nnodes 2 --node-rank 0 --master-addr node0 model=llama-7b    (on node0)
#            launch/torchrun.sh --nnodes 2 --node-rank 1 --master-addr node0 model=llama-7b    (on node1)
# It runs the gptscale of the checkout it lives in; the environment it sets is launch/env.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

die() {
    echo "launch/torchrun.sh: $*" >&2
    exit 2
}

nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
nproc_per_node=${NPROC_PER_NODE:-}
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-29500}
rdzv_id=${RDZV_ID:-gptscale}
rdzv_timeout=${GPTSCALE_RDZV_TIMEOUT:-}
max_restarts=${GPTSCALE_MAX_RESTARTS:-}

while (($#)); do
    case $1 in
        --nnodes | --node-rank | --nproc-per-node | --master-addr | --master-port | --rdzv-id | --rdzv-timeout | \
            --max-restarts)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --nnodes) nnodes=$2 ;;
                --node-rank) node_rank=$2 ;;
                --nproc-per-node) nproc_per_node=$2 ;;
                --master-addr) master_addr=$2 ;;
                --master-port) master_port=$2 ;;
                --rdzv-id) rdzv_id=$2 ;;
                --rdzv-timeout) rdzv_timeout=$2 ;;
                --max-restarts) max_restarts=$2 ;;
            esac
            shift 2
            ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        --)
            shift
            break
            ;;
        --*) die "unknown option $1 (Hydra overrides have no leading dashes; see --help)" ;;
        *) break ;;
    esac
done

visible_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        if [[ -z $CUDA_VISIBLE_DEVICES || $CUDA_VISIBLE_DEVICES == -1 ]]; then echo 0; else
            awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"; fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

is_count() { [[ $1 =~ ^[0-9]+$ ]]; }
is_count "$nnodes" && ((nnodes >= 1)) || die "--nnodes must be a positive integer, got '$nnodes'"
is_count "$node_rank" && ((node_rank < nnodes)) || die "--node-rank must be in 0..$((nnodes - 1)), got '$node_rank'"
is_count "$master_port" || die "--master-port must be a port number, got '$master_port'"

gpus=$(visible_gpus)
if ((gpus > 0)); then
    slots=$gpus
    slot_kind="GPU(s)"
else
    slots=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # the cores this process may use
    slot_kind="CPU core(s) and no GPU"
fi
nproc_per_node=${nproc_per_node:-$((gpus > 0 ? gpus : 1))}
is_count "$nproc_per_node" && ((nproc_per_node >= 1)) ||
    die "--nproc-per-node must be a positive integer, got '$nproc_per_node'"
((nproc_per_node <= slots)) ||
    die "asked for $nproc_per_node ranks per node, but this node ($(hostname)) has $slots $slot_kind"

if ((nnodes > 1)) && [[ -z $master_addr ]]; then
    die "--master-addr (or MASTER_ADDR) is required with $nnodes nodes: the address of node 0"
fi

export NPROC_PER_NODE=$nproc_per_node
# shellcheck source=launch/env.sh
source "$here/env.sh"
rdzv_timeout=${rdzv_timeout:-$GPTSCALE_RDZV_TIMEOUT}
is_count "$rdzv_timeout" && ((rdzv_timeout >= 1)) || die "--rdzv-timeout must be a positive integer, got '$rdzv_timeout'"
max_restarts=${max_restarts:-$GPTSCALE_MAX_RESTARTS}
is_count "$max_restarts" || die "--max-restarts must be a non-negative integer, got '$max_restarts'"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if ((nnodes == 1)) && [[ -z $master_addr ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--rdzv_backend=c10d "--rdzv_endpoint=$master_addr:$master_port" "--rdzv_id=$rdzv_id"
        "--rdzv_conf=is_host=$((node_rank == 0)),join_timeout=$rdzv_timeout,read_timeout=$rdzv_timeout")
fi

exec "${PYTHON:-python}" -m gptscale.parallel.torchrun --nnodes="$nnodes" --nproc_per_node="$nproc_per_node" \
    "${rendezvous[@]}" --max_restarts="$max_restarts" --signals_to_handle=SIGHUP,SIGQUIT \
    -m gptscale.train "$@"
