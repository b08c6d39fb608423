#!/usr/bin/env bash
# Cloud TPU pod slice: create (queued resource), copy the code to every worker, install, train,
# fetch one log per worker, delete. Every worker runs the same command (--worker=all);
# contrastive.distributed (--distributed=on) finds the other workers via the TPU metadata.
#
#   export TPU_NAME=simclr ZONE=us-central2-b PROJECT=my-project ACCELERATOR_TYPE=v4-32 \
#          NUM_WORKERS=4 WORKDIR=gs://my-bucket/simclr CONFIG=configs/simclr_fmnist.py:resnet50
#   launch/tpu_pod.sh [--dry-run] all          # create, copy, install, train
#   launch/tpu_pod.sh --dry-run train         # the compile-only check here, then print the command
#   launch/tpu_pod.sh logs | delete           # one log per worker in ./logs/$TPU_NAME/; teardown
#   launch/tpu_pod.sh train --config.batch_size=8192   # extra flags go to contrastive.main
#
# Optional: RUNTIME_VERSION (default tpu-ubuntu2204-base), SPOT=1 (preemptible capacity:
# preemption sends SIGTERM, the run saves a checkpoint; rerun `train` to resume), REPO_URL
# (git clone it on the workers instead of copying this checkout), DATASET_FLAGS.
#
# Before `all` and `train`, --dry-run runs `python -m contrastive.aot` on this machine, for real:
# the train step compiled for the slice's topology (TOPOLOGY, default from ACCELERATOR_TYPE, e.g.
# v4-32 -> v4:2x2x4; launch/common.sh) must fit each chip's memory, or the script stops (exit 1)
# before anything is created. It needs requirements-tpu.txt installed here (libtpu's compiler; no
# TPU). AOT_CHECK=0 skips it; AOT_CHECK=1 runs it before a real launch too. PYTHON: its python.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
parse_dry_run "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
STEP="${1:-all}"
shift || true

: "${TPU_NAME:?set TPU_NAME, the TPU VM name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${PROJECT:?set PROJECT, the GCP project}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v4-32}"
: "${WORKDIR:?set WORKDIR to a gs:// path all workers can write}"
CONFIG="${CONFIG:-configs/simclr_fmnist.py:resnet50}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-contrastive}"
LOG="contrastive-train.log"
PYTHON="${PYTHON:-python}"
AOT_CHECK="${AOT_CHECK:-$DRY_RUN}"

gcloud_tpu=(gcloud compute tpus tpu-vm --project="$PROJECT" --zone="$ZONE")
on_all() { run "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all --command="$1"; }

create() {
  local spot=()
  if [[ "${SPOT:-0}" == 1 ]]; then spot=(--spot); fi
  run gcloud compute tpus queued-resources create "$TPU_NAME-qr" --project="$PROJECT" \
    --zone="$ZONE" --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
  if (( DRY_RUN )); then
    echo "# wait until: gcloud compute tpus queued-resources describe $TPU_NAME-qr ... = ACTIVE"
    return
  fi
  until [[ "$(gcloud compute tpus queued-resources describe "$TPU_NAME-qr" --project="$PROJECT" \
      --zone="$ZONE" --format='value(state.state)')" == ACTIVE ]]; do sleep 30; done
}

copy() {
  if [[ -n "${REPO_URL:-}" ]]; then
    on_all "rm -rf ~/$REMOTE_DIR && git clone $REPO_URL ~/$REMOTE_DIR"
  else
    on_all "rm -rf ~/$REMOTE_DIR"
    run "${gcloud_tpu[@]}" scp --recurse --worker=all "$PWD" "$TPU_NAME:~/$REMOTE_DIR"
  fi
}

install() {
  # requirements-tpu.txt: the pinned jax with its TPU runtime (libtpu), not the newest jax.
  on_all "cd ~/$REMOTE_DIR && make install && pip install -r requirements-tpu.txt"
}

# aot_check [contrastive.main flags]: compiles the train step for the slice on this machine;
# exits 1 if it does not fit the per-chip memory, with contrastive.aot's status if it fails.
aot_check() {
  local topology="${TOPOLOGY:-}" flags=() a status=0
  if [[ -z "$topology" ]]; then topology="$(tpu_topology "$ACCELERATOR_TYPE")" || exit 2; fi
  # shellcheck disable=SC2086  # DATASET_FLAGS is a list of flags
  for a in ${DATASET_FLAGS:-} "$@"; do
    if [[ "$a" == --config.* ]]; then flags+=("$a"); fi
  done
  local cmd=("$PYTHON" -m contrastive.aot --config="$CONFIG" --topology="$topology"
             ${flags[@]+"${flags[@]}"})
  echo "# compile-only check on this machine (AOT_CHECK=0 skips it): $(quote "${cmd[@]}")"
  "${cmd[@]}" || status=$?
  if (( status == 1 )); then
    echo "The train step does not fit $topology (contrastive.aot above); nothing was launched." >&2
    exit 1
  elif (( status != 0 )); then
    echo "contrastive.aot failed (exit $status) for $topology; nothing was launched." >&2
    exit "$status"
  fi
}

train() {
  # Clear a stale run first (it would hold the TPU), then the same command on every worker.
  on_all "pkill -f 'python -m contrastive.main' || true; cd ~/$REMOTE_DIR && \
python -m contrastive.main --config=$CONFIG --workdir=$WORKDIR --distributed=on \
${DATASET_FLAGS:-} $* > ~/$LOG 2>&1"
}

logs() {
  : "${NUM_WORKERS:?set NUM_WORKERS, the TPU VM hosts in the slice (e.g. 4 for v4-32)}"
  run mkdir -p "logs/$TPU_NAME"
  for (( w = 0; w < NUM_WORKERS; w++ )); do
    run "${gcloud_tpu[@]}" scp --worker="$w" "$TPU_NAME:~/$LOG" "logs/$TPU_NAME/worker-$w.log"
  done
}

delete() {
  run gcloud compute tpus queued-resources delete "$TPU_NAME-qr" --project="$PROJECT" \
    --zone="$ZONE" --force --quiet
}

case "$STEP" in
  all) if [[ "$AOT_CHECK" == 1 ]]; then aot_check "$@"; fi; create; copy; install; train "$@" ;;
  create|copy|install|logs|delete) "$STEP" ;;
  train) if [[ "$AOT_CHECK" == 1 ]]; then aot_check "$@"; fi; train "$@" ;;
  *) echo "unknown step '$STEP'; use all|create|copy|install|train|logs|delete" >&2; exit 2 ;;
esac
