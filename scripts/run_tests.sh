#!/usr/bin/env bash
# `make test`: the unit tests (pytest-xdist, two workers of one torch thread each) and the smoke run of every notebook,
# side by side so that both cores stay busy. The notebooks' output is kept in a log and printed after pytest's; the
# exit status is non-zero when either failed. Environment: PYTHON (the venv's interpreter), MAKE.
set -uo pipefail
PYTHON=${PYTHON:-python3}
MAKE=${MAKE:-make}
log=$(mktemp -t minillm-notebooks-smoke.XXXXXX.log)
start=$(date +%s)
OMP_NUM_THREADS=1 "$MAKE" --no-print-directory notebooks-smoke PYTHON="$PYTHON" SETUP= >"$log" 2>&1 &
notebooks=$!
# a Ctrl-C or kill of `make test` stops the notebook run too (run_notebooks.sh stops its kernel on TERM)
trap 'kill -TERM "$notebooks" 2>/dev/null; wait "$notebooks" 2>/dev/null; rm -f "$log"; exit 130' INT TERM HUP
"$PYTHON" -m pytest -q -ra -n 2 --durations=${DURATIONS:-15} tests
tests_status=$?
echo "== pytest done in $(( $(date +%s) - start )) s (status $tests_status); waiting for the smoke notebooks"
wait "$notebooks"
notebooks_status=$?
echo "== smoke notebooks (log follows), status $notebooks_status"
cat "$log"
rm -f "$log"
echo "== make test done in $(( $(date +%s) - start )) s"
[ "$tests_status" -eq 0 ] && [ "$notebooks_status" -eq 0 ]
