"""Survivors and survival rate of the last mutation run (scripts/mutation.sh), from mutants/.

    .venv/bin/python scripts/mutation_summary.py [SECONDS]   # after `mutmut results > mutants/results.txt`

Equivalent mutants (scripts/mutation_equivalent.md) are left out of the rate, and so are mutants not checked (an
interrupted run); timeouts count as killed.
"""

import json
import re
import sys
from pathlib import Path

seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 0
lines = [line.strip() for line in Path("mutants/results.txt").read_text().splitlines() if line.strip()]
status = dict(line.rsplit(": ", 1) for line in lines)
equivalent = set(re.findall(r"^- `([^`]+)`", Path("scripts/mutation_equivalent.md").read_text(), re.M))
counts = {}  # every mutant generated -> its exit code
for meta in Path("mutants").rglob("*.py.meta"):
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        counts[name] = code
total = len(counts)
undetected = {n for n, s in status.items() if s in ("survived", "no tests")}
other = {n: s for n, s in status.items() if s not in ("survived", "no tests", "timeout")}
survivors = sorted(undetected - equivalent)
considered = total - len(equivalent & set(counts)) - len(other)
others = sorted({s for s in other.values()})
print(f"\nmutants: {total}; not killed: {len(status)} ({len(undetected)} survived or untested, "
      f"{sum(s == 'timeout' for s in status.values())} timed out (counted as killed)"
      + "".join(f", {sum(v == s for v in other.values())} {s}" for s in others) + ")")
print(f"equivalent (scripts/mutation_equivalent.md): {len(equivalent & set(counts))}"
      + (f"; listed but not generated: {sorted(equivalent - set(counts))}" if equivalent - set(counts) else ""))
print("surviving non-equivalent mutants:" if survivors else "no surviving non-equivalent mutants")
for name in survivors:
    print(f"    {name}: {status[name]}")
print(f"survival rate: {len(survivors)}/{considered} = {100 * len(survivors) / max(considered, 1):.1f}% "
      f"of the non-equivalent mutants checked survived; {seconds // 60} min {seconds % 60} s")
