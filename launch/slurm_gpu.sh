#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node owning all its GPUs.
#
#   CONFIG=configs/simclr_fmnist.py:resnet50 WORKDIR=/shared/runs/r50 NODES=4 \
#     GPUS_PER_NODE=8 launch/slurm_gpu.sh [--dry-run] [extra contrastive.main flags]
#
# sbatch queues the job; srun starts the same command on every node, and
# contrastive.distributed detects SLURM (SLURM_NTASKS > 1) and calls jax.distributed.initialize,
# which reads the coordinator, process count and rank from SLURM's environment.
# SLURM sends SIGTERM $SIGNAL_SECONDS before the time limit (--signal), so the run saves a
# checkpoint and exits cleanly; with --requeue the job restarts and resumes from it.
# One log per node: $LOG_DIR/<job name>-<job id>-node<rank>.log. WORKDIR must be shared storage.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
parse_dry_run "$@"

: "${CONFIG:?set CONFIG, e.g. configs/simclr_fmnist.py:resnet50}"
: "${WORKDIR:?set WORKDIR on storage every node mounts}"
: "${NODES:?set NODES, the number of nodes}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TIME="${TIME:-24:00:00}"
JOB_NAME="${JOB_NAME:-contrastive}"
SIGNAL_SECONDS="${SIGNAL_SECONDS:-300}"
LOG_DIR="${LOG_DIR:-$WORKDIR/logs}"
PYTHON="${PYTHON:-python}"
SBATCH_EXTRA="${SBATCH_EXTRA:-}"  # e.g. --partition=gpu --account=me

train_cmd=("$PYTHON" -m contrastive.main --config="$CONFIG" --workdir="$WORKDIR"
           --distributed=auto ${ARGS[@]+"${ARGS[@]}"})
srun_cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=1
          --output="$LOG_DIR/%x-%j-node%t.log" "${train_cmd[@]}")

run mkdir -p "$LOG_DIR"
# shellcheck disable=SC2086  # SBATCH_EXTRA is a list of flags
run sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node=1 \
  --gpus-per-node="$GPUS_PER_NODE" --time="$TIME" --signal="TERM@$SIGNAL_SECONDS" --requeue \
  --output="$LOG_DIR/%x-%j.out" $SBATCH_EXTRA --wrap="$(quote "${srun_cmd[@]}")"
