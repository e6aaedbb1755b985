#!/usr/bin/env bash
# Mutation testing (not in CI; a complete run from scratch took 30 minutes with JOBS=2 on the idle 2-core development
# README): mutmut plants one small change at a time ("mutant": > for >=, a dropped line, another
# constant...) in the modules below and runs their fast tests against each; a mutant that no test notices
# "survived". Prints the survivors and the survival rate over the mutants
# that are not equivalent (scripts/mutation_equivalent.md lists those, with why), the run's wall time, its CPU time
# (the figure that does not depend on what else the machine runs) and the load average during the run.
#
#   bash scripts/mutation.sh                     # everything, from scratch
#   JOBS=1 bash scripts/mutation.sh              # one test process at a time (default: 2)
#   PYTHON=/path/to/venv/bin/python bash scripts/mutation.sh
#   KEEP=1 bash scripts/mutation.sh              # keep mutants/: only mutants whose function changed are re-run
#   bash scripts/mutation.sh 'captioner.batch.records.*'   # only the mutants whose names match (mutmut run NAMES)
#
# Modules: captioner/decoding.py, captioner/preprocess.py, captioner/batch/records.py, captioner/batch/resume.py,
# service/microbatch.py; the tests and all settings are [tool.mutmut] in pyproject.toml. Work files go to mutants/
# (git-ignored); `mutmut show NAME` (same venv, from the repository root) prints one mutant's diff afterwards, and
# `mutmut run NAME...` re-checks single mutants (e.g. after adding a test).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
MUTMUT_VERSION=3.8.1
if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('mutmut') != '$MUTMUT_VERSION')" 2>/dev/null
then
    "$PYTHON" -m pip install --quiet "mutmut==$MUTMUT_VERSION"
fi
MUTMUT="$(dirname "$PYTHON")/mutmut"

if [ -z "${KEEP:-}" ]; then
    rm -rf mutants  # from scratch: mutmut keeps earlier verdicts otherwise
fi
mkdir -p mutants
# The 1-minute load average every 30 s while mutmut runs: other jobs on the machine stretch the wall time.
(while sleep 30; do cut -d' ' -f1 /proc/loadavg; done) > mutants/load.txt &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT
start=$(date +%s)
# mutmut puts mutants/ first on the import path; PYTHONPATH must not put the unmutated checkout before it.
status=0
# tests/conftest.py loads torchvision and builds the test models once in the fork server (see _prewarm there).
export CAPTIONER_TEST_PREWARM=1
env -u PYTHONPATH "$MUTMUT" run --max-children "${JOBS:-2}" "$@" > mutants/run.log 2>&1 || status=$?
seconds=$(( $(date +%s) - start ))
kill "$sampler" 2>/dev/null || true
# CPU seconds of mutmut and every test process it forked (bash's `times`: user and system time of finished children).
times > mutants/times.txt  # (not in $(...): a subshell starts with zero child times)
cpu=$(tail -n 1 mutants/times.txt | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); print int(u[1] * 60 + u[2] + s[1] * 60 + s[2]) }')
# mutmut redraws its progress line with carriage returns: show the last state only.
tr '\r' '\n' < mutants/run.log | grep -v '^[[:space:]]*$' | tail -n 3
if [ "$status" -ne 0 ]; then
    echo "mutmut run failed with status $status (log: mutants/run.log)" >&2
    exit 1
fi
env -u PYTHONPATH "$MUTMUT" results > mutants/results.txt  # every mutant not killed, with its status
"$PYTHON" scripts/mutation_summary.py "$seconds" "$cpu" mutants/load.txt
