#!/usr/bin/env bash
# Mutation testing (not in CI; ~20-30 minutes on a 2-core machine): mutmut plants one small change at a time
# ("mutant": > for >=, a dropped line, another constant...) in the modules below and runs their fast tests against
# each; a mutant that no test notices "survived". Prints the survivors and the survival rate over the mutants that
# are not equivalent (scripts/mutation_equivalent.md lists those, with why).
#
#   bash scripts/mutation.sh                     # everything, from scratch
#   JOBS=1 bash scripts/mutation.sh              # one test process at a time (default: 2)
#   PYTHON=/path/to/venv/bin/python bash scripts/mutation.sh
#
# Modules: captioner/decoding.py, captioner/preprocess.py, captioner/batch/records.py, captioner/batch/resume.py,
# service/microbatch.py; the tests and all settings are [tool.mutmut] in pyproject.toml. Work files go to mutants/
# (git-ignored); `mutmut show NAME` (same venv, from the repository root) prints one mutant's diff afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
MUTMUT_VERSION=3.8.1
if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('mutmut') != '$MUTMUT_VERSION')" 2>/dev/null
then
    "$PYTHON" -m pip install --quiet "mutmut==$MUTMUT_VERSION"
fi
MUTMUT="$(dirname "$PYTHON")/mutmut"

rm -rf mutants  # from scratch: mutmut keeps earlier verdicts otherwise
mkdir mutants
start=$(date +%s)
# mutmut puts mutants/ first on the import path; PYTHONPATH must not put the unmutated checkout before it.
env -u PYTHONPATH "$MUTMUT" run --max-children "${JOBS:-2}" > mutants/run.log 2>&1 || {
    tail -n 40 mutants/run.log
    echo "mutmut run failed (log: mutants/run.log)" >&2
    exit 1
}
tail -n 3 mutants/run.log
env -u PYTHONPATH "$MUTMUT" results > mutants/results.txt  # every mutant not killed, with its status
"$PYTHON" scripts/mutation_summary.py "$(( $(date +%s) - start ))"
