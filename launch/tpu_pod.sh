#!/usr/bin/env bash
# Cloud TPU pod slice: create (queued resource), copy the code to every worker, install, train,
# fetch one log per worker, delete. Every worker runs the same command (--worker=all);
# contrastive.distributed (--distributed=on) finds the other workers via the TPU metadata.
#
#   export TPU_NAME=simclr ZONE=us-central2-b PROJECT=my-project ACCELERATOR_TYPE=v4-32 \
#          NUM_WORKERS=4 WORKDIR=gs://my-bucket/simclr CONFIG=configs/simclr_fmnist.py:resnet50
#   launch/tpu_pod.sh [--dry-run] all          # create, copy, install, train
#   launch/tpu_pod.sh logs | delete           # one log per worker in ./logs/$TPU_NAME/; teardown
#   launch/tpu_pod.sh train --config.batch_size=8192   # extra flags go to contrastive.main
#
# Optional: RUNTIME_VERSION (default tpu-ubuntu2204-base), SPOT=1 (preemptible capacity:
# preemption sends SIGTERM, the run saves a checkpoint; rerun `train` to resume), REPO_URL
# (git clone it on the workers instead of copying this checkout), DATASET_FLAGS.
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
  on_all "cd ~/$REMOTE_DIR && make install && pip install -U 'jax[tpu]'"
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
  all) create; copy; install; train "$@" ;;
  create|copy|install|logs|delete) "$STEP" ;;
  train) train "$@" ;;
  *) echo "unknown step '$STEP'; use all|create|copy|install|train|logs|delete" >&2; exit 2 ;;
esac
