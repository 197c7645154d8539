# The environment of every gptscale launch, in one place. launch/torchrun.sh sources it (and so slurm.sbatch
# does, through torchrun.sh); hydra/launcher=slurm sources it before its tasks start. A variable that is
# already set keeps its value, so a site sets its own (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) before launching.

# CPU threads per rank: the node's cores shared among its ranks.
_ranks_per_node=${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
_cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc itself obeys OMP_NUM_THREADS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( _cores / _ranks_per_node > 0 ? _cores / _ranks_per_node : 1 ))}
unset _ranks_per_node _cores

# NCCL: a failed or stuck collective ends the job with an error instead of hanging it; warnings only.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# megatron-core's tensor/sequence-parallel overlap relies on kernels being issued in order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# On SIGTERM or SIGUSR1 (slurm.sbatch's warning ahead of the time limit) torchrun passes the signal to the
# ranks, which finish the step, save a checkpoint and exit. They get this many seconds before torchrun kills
# them; keep it below the lead time of slurm.sbatch's --signal.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

# Seconds for every node to reach node 0 and join the rendezvous before torchrun gives up with an error.
export GPTSCALE_RDZV_TIMEOUT=${GPTSCALE_RDZV_TIMEOUT:-600}

# In-job restarts after a failure (torchrun's --max_restarts): the ranks resume from the newest checkpoint.
# Restarts that bring no new checkpoint stop sooner (fault.max_restarts_without_progress, exit code 76).
export GPTSCALE_MAX_RESTARTS=${GPTSCALE_MAX_RESTARTS:-10}

# Logs reach the job's output file as they are written.
export PYTHONUNBUFFERED=1
