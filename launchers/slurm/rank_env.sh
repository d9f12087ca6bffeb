#!/usr/bin/env bash
# Run once per srun task: translate Slurm's task layout into the variables torch.distributed and
# DeepSpeed read (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE), then exec the
# command so signals sent to the task reach the trainer itself.
# MASTER_ADDR and MASTER_PORT come from the job script (the same for every task).
set -euo pipefail

: "${SLURM_PROCID:?run me under srun}"
: "${MASTER_ADDR:?MASTER_ADDR must be set by the job script}"
: "${MASTER_PORT:?MASTER_PORT must be set by the job script}"

# Tasks on this node in this step. SLURM_STEP_TASKS_PER_NODE is compressed per node in node order,
# e.g. "2(x3),1"; SLURM_NTASKS_PER_NODE is unset when only --ntasks was given, and an empty
# LOCAL_SIZE would crash DeepSpeed's shared-memory allreduce (std::stoi).
tasks_on_node() {
  local spec=$1 node=$2 item count reps i=0
  local IFS=,
  for item in $spec; do
    count=${item%%(*}
    reps=1
    [[ $item == *"(x"* ]] && { reps=${item#*(x}; reps=${reps%)}; }
    if (( node < i + reps )); then echo "$count"; return; fi
    i=$(( i + reps ))
  done
  echo 1
}

export RANK=$SLURM_PROCID
export WORLD_SIZE=${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}
export LOCAL_RANK=$SLURM_LOCALID
export LOCAL_SIZE
LOCAL_SIZE=$(tasks_on_node "${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}" "${SLURM_NODEID:-0}")
export CROSS_RANK=${SLURM_NODEID:-0}
export CROSS_SIZE=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}
# torchrun sets one thread per process; the deepspeed launcher sets nothing. Follow --cpus-per-task.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "[rank_env] rank=$RANK/$WORLD_SIZE local=$LOCAL_RANK/$LOCAL_SIZE node=${SLURMD_NODENAME:-$(hostname)}" \
  "master=$MASTER_ADDR:$MASTER_PORT" >&2
exec "$@"
