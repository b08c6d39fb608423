# Shared by the launch scripts: --dry-run handling and command echoing. Source, don't run.
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
