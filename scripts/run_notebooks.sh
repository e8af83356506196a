#!/usr/bin/env bash
# Execute numbered notebooks in order with papermill into notebooks/executed/, passing the profile.
# Environment: PYTHON (interpreter with papermill), PROFILE (smoke|cpu|gpu|paper), MINILLM_NO_COMPUTE=1 to only
# re-render from committed records.
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
for nb in "$@"; do
  name=$(basename "$nb")
  echo "== $name (profile $PROFILE)"
  start=$(date +%s)
  "$PYTHON" -m papermill --cwd notebooks -k python3 -p profile "$PROFILE" -p no_compute "$NO_COMPUTE" \
    "$nb" "$out/$name" --log-output --no-progress-bar
  echo "== $name done in $(( $(date +%s) - start )) s"
done
