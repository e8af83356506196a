#!/usr/bin/env bash
# Execute numbered notebooks in order with papermill into notebooks/executed/, passing the profile.
# Environment: PYTHON (interpreter with papermill), PROFILE (smoke|cpu|cpu-full|gpu|paper), MINILLM_NO_COMPUTE=1 to
# only re-render from committed records.
# A computing run writes results/<profile>/run_times.json when it started from no records (run_times_resumed.json,
# not committed, otherwise): seconds per notebook, records that existed before it, commit, date and machine.
set -euo pipefail
PYTHON=${PYTHON:-python3}
PROFILE=${PROFILE:-cpu}
NO_COMPUTE=${MINILLM_NO_COMPUTE:-0}
out=notebooks/executed/$PROFILE
mkdir -p "$out"
if [ "$#" -eq 0 ]; then
  echo "no notebooks given" >&2
  exit 1
fi
# Stop the whole tree of the running notebook (papermill and its kernel, which runs in its own session) when this
# script is interrupted or killed: otherwise the kernel keeps computing and writing records as an orphan.
child=""
kill_tree() {
  local pid=$1 c
  for c in $(pgrep -P "$pid" 2>/dev/null || true); do
    kill_tree "$c"
  done
  kill -TERM "$pid" 2>/dev/null || true
}
on_signal() {
  trap - INT TERM HUP
  if [ -n "$child" ]; then
    echo "== interrupted: stopping papermill (pid $child) and its kernel" >&2
    kill_tree "$child"
    wait "$child" 2>/dev/null || true
  fi
  exit 130
}
trap on_signal INT TERM HUP
records_before=$( (find "results/$PROFILE" -name "*.json" ! -name "run_times*.json" 2>/dev/null || true) | wc -l)
times=()
run_start=$(date +%s)
# papermill NOTEBOOK NO_COMPUTE: execute one notebook into $out; stop the script with its status if it fails. In the
# background, so that the trap runs as soon as a signal arrives (bash defers traps while a foreground child runs).
execute() {
  "$PYTHON" -m papermill --cwd notebooks -k python3 -p profile "$PROFILE" -p no_compute "$2" \
    "$1" "$out/$(basename "$1")" --log-output --no-progress-bar &
  child=$!
  local status=0
  wait "$child" || status=$?
  child=""
  if [ "$status" -ne 0 ]; then
    exit "$status"
  fi
  "$PYTHON" "$(dirname "$0")/normalize_notebook.py" "$out/$(basename "$1")"
}
for nb in "$@"; do
  name=$(basename "$nb")
  echo "== $name (profile $PROFILE)"
  start=$(date +%s)
  execute "$nb" "$NO_COMPUTE"
  secs=$(( $(date +%s) - start ))
  times+=("$name=$secs")
  echo "== $name done in $secs s"
done
echo "== all notebooks done in $(( $(date +%s) - run_start )) s"
# After a computing run of several notebooks, render them again from the records alone (no computation). Notebook 01
# ends with the claims table, which also reads the memory and latency records that notebooks 02 and 03 write: a run
# from scratch must not leave a claims table without its memory and speed evidence. And the executed notebooks kept
# in git are then those of a render from the records, the same files `make figures` writes (RENDER_AGAIN=all, the
# default); RENDER_AGAIN=claims renders notebook 01 only (the smoke run, whose executed notebooks are not kept).
# Not counted in run_times.
RENDER_AGAIN=${RENDER_AGAIN:-all}
if [ "$NO_COMPUTE" = "0" ] && [ "$#" -gt 1 ]; then
  for nb in "$@"; do
    case "$RENDER_AGAIN:$(basename "$nb")" in
      all:*|claims:01_*)
        echo "== $(basename "$nb") rendered again from the records"
        execute "$nb" 1 ;;
    esac
  done
fi
if [ "$NO_COMPUTE" = "0" ]; then
  "$PYTHON" - "$PROFILE" "$records_before" "${times[@]}" <<'PY'
import sys
from minillm.artifact.records import REPO_ROOT
from minillm.files import write_json_atomic
from minillm.provenance import provenance
profile, before, *pairs = sys.argv[1:]
secs = {k: int(v) for k, v in (p.split("=", 1) for p in pairs)}
# a from-scratch run is the measurement REPRODUCING.md quotes; a resumed run must not overwrite it
name = "run_times.json" if int(before) == 0 else "run_times_resumed.json"
write_json_atomic(REPO_ROOT / "results" / profile / name, {
    "profile": profile, "records_before": int(before), "from_scratch": int(before) == 0,
    "notebook_seconds": secs, "total_seconds": sum(secs.values()), "provenance": provenance(None)})
PY
fi
