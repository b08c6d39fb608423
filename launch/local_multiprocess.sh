#!/usr/bin/env bash
# N local CPU processes, each with its own virtual CPU devices, as one jax.distributed job.
# The same command as a TPU pod or a GPU cluster runs, on one machine: a test of the
# multi-process code paths (data sharding by process, global arrays, checkpoints, metrics).
#
#   CONFIG=configs/simclr_fmnist.py:runlocal WORKDIR=/tmp/mp launch/local_multiprocess.sh
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 PORT=12355 ... launch/local_multiprocess.sh --dry-run
#   Extra arguments go to contrastive.main, e.g. --config.total_steps=20.
#
# One log per process in $LOG_DIR (default $WORKDIR/logs); exits non-zero if any process fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
parse_dry_run "$@"

: "${CONFIG:?set CONFIG, e.g. configs/simclr_fmnist.py:runlocal}"
: "${WORKDIR:?set WORKDIR, the shared checkpoint/metrics directory}"
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-12355}"
LOG_DIR="${LOG_DIR:-$WORKDIR/logs}"
PYTHON="${PYTHON:-python}"

# The caller's XLA_FLAGS are kept; each process gets its own device count.
PROCESS_XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

run mkdir -p "$LOG_DIR"
for (( i = 0; i < NUM_PROCESSES; i++ )); do
  run_logged "$LOG_DIR/process-$i.log" env JAX_PLATFORMS=cpu \
      XLA_FLAGS="$PROCESS_XLA_FLAGS" \
      "$PYTHON" -m contrastive.main --config="$CONFIG" --workdir="$WORKDIR" \
      --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM_PROCESSES" \
      --process_id="$i" ${ARGS[@]+"${ARGS[@]}"}
done
if (( DRY_RUN )); then echo "wait"; exit 0; fi
status=0
for (( i = 0; i < NUM_PROCESSES; i++ )); do
  if ! wait "${PIDS[$i]}"; then
    echo "process $i failed; see $LOG_DIR/process-$i.log" >&2
    status=1
  fi
done
exit "$status"
