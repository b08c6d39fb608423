# Shared by the launch scripts: --dry-run handling, command echoing, TPU topology names.
# Source, don't run.
# After `parse_dry_run "$@"`, ARGS holds the arguments without --dry-run, and
# `run CMD...` prints CMD (shell-quoted) under --dry-run instead of running it.

DRY_RUN=0
ARGS=()

parse_dry_run() {
  local a
  for a in "$@"; do
    if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
  done
}

# quote ARG...: the arguments as one shell-safe line (single quotes only where needed).
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then out+=("$a")
    else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run() {
  if (( DRY_RUN )); then quote "$@"; else "$@"; fi
}

# run_logged LOG CMD...: runs CMD in the background with stdout+stderr to LOG; its pid is
# appended to PIDS.
PIDS=()
run_logged() {
  local log="$1"; shift
  if (( DRY_RUN )); then echo "$(quote "$@") > $(quote "$log") 2>&1 &"; return; fi
  "$@" > "$log" 2>&1 &
  PIDS+=("$!")
}

# tpu_topology ACCELERATOR_TYPE: jax's TPU topology name for a Cloud TPU accelerator type, as
# `python -m contrastive.aot --topology` takes it: v4-32 -> v4:2x2x4 (v4 and v5p count
# TensorCores, 2 per chip; 3-D tori), v5litepod-16 -> v5e:4x4, v6e-64 -> v6e:8x8 (chips; 2-D).
# Power-of-two slices only; set TOPOLOGY yourself for another shape.
tpu_topology() {
  local type="$1" gen n chips
  gen="${type%-*}"; n="${type##*-}"
  if [[ "$type" != *-* || ! "$n" =~ ^[0-9]+$ ]] || (( n < 1 )); then
    echo "tpu_topology: cannot read '$type' (expected e.g. v4-32, v5litepod-16, v5p-8, v6e-8)" >&2
    return 2
  fi
  case "$gen" in
    v4|v5p) chips=$(( n / 2 )) ;;
    v5litepod|v5e) chips=$n; gen=v5e ;;
    v6e) chips=$n ;;
    *) echo "tpu_topology: unknown TPU generation '$gen' in '$type'; set TOPOLOGY" >&2
       return 2 ;;
  esac
  if (( chips < 1 || (chips & (chips - 1)) != 0 )); then
    echo "tpu_topology: $type has $chips chip(s), not a power of two; set TOPOLOGY" >&2
    return 2
  fi
  if [[ "$gen" == v4 || "$gen" == v5p ]]; then
    # 4 chips: 2x2x1; from 2x2x2 on, double z, then y, then x: 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
    if (( chips < 4 )); then
      echo "tpu_topology: $type is smaller than a 2x2x1 slice; set TOPOLOGY" >&2; return 2
    fi
    local d=(2 2 1) i=2
    if (( chips >= 8 )); then d=(2 2 2); fi
    local c=$(( d[0] * d[1] * d[2] ))
    while (( c < chips )); do
      d[i]=$(( d[i] * 2 )); c=$(( c * 2 )); i=$(( (i + 2) % 3 ))
    done
    echo "$gen:${d[0]}x${d[1]}x${d[2]}"
  else
    # 2-D: the smaller side first, as jax names them: 1x1, 1x2, 2x2, 2x4, 4x4, ..., 16x16.
    local a=1 b=1
    while (( a * b < chips )); do
      if (( b == a )); then b=$(( b * 2 )); else a=$(( a * 2 )); fi
    done
    echo "$gen:${a}x${b}"
  fi
}
