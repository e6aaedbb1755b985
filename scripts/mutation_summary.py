"""Survivors and survival rate of the last mutation run (scripts/mutation.sh), from mutants/.

    .venv/bin/python scripts/mutation_summary.py [SECONDS [CPU_SECONDS [LOAD_FILE]]]
    # after `mutmut results > mutants/results.txt`; mutation.sh passes the run's wall and CPU time and its load samples

Equivalent mutants (scripts/mutation_equivalent.md) are left out of the rate, and so are mutants not checked (an
interrupted run); timeouts count as killed (they are listed, since a heavily loaded machine can make a slow mutant
time out).
"""

import json
import os
import re
import sys
from pathlib import Path

seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 0
cpu_seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 0
load_file = Path(sys.argv[3]) if len(sys.argv) > 3 else None
lines = [line.strip() for line in Path("mutants/results.txt").read_text().splitlines() if line.strip()]
status = dict(line.rsplit(": ", 1) for line in lines)
listed = Path("scripts/mutation_equivalent.md").read_text()
equivalent = set(re.findall(r"^- `([^`]+)`", listed, re.M))
gpu_only = set(re.findall(r"^- `([^`]+)`: \*\*GPU only\*\*", listed, re.M))  # equivalent on a CPU-only machine
counts = {}  # every mutant generated -> its exit code
for meta in Path("mutants").rglob("*.py.meta"):
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        counts[name] = code
total = len(counts)
undetected = {n for n, s in status.items() if s in ("survived", "no tests")}
timeouts = sorted(n for n, s in status.items() if s == "timeout")
other = {n: s for n, s in status.items() if s not in ("survived", "no tests", "timeout")}
survivors = sorted(undetected - equivalent)
# Mutants with a verdict (killed, timed out, survived, untested), less the equivalent ones.
checked = {n for n, code in counts.items() if code is not None and n not in other}
considered = len(checked - equivalent)
others = sorted(set(other.values()))
print(f"\nmutants: {total}; not killed: {len(status)} ({len(undetected)} survived or untested, "
      f"{len(timeouts)} timed out (counted as killed)"
      + "".join(f", {sum(v == s for v in other.values())} {s}" for s in others) + ")")
for name in timeouts:
    print(f"    timed out: {name}")
print(f"equivalent (scripts/mutation_equivalent.md): {len(equivalent & set(counts))}"
      f" (of which {len(gpu_only & set(counts))} observable only on a GPU), {len(equivalent & checked)} of them checked"
      + (f"; listed but not generated: {sorted(equivalent - set(counts))}" if equivalent - set(counts) else ""))
print("surviving non-equivalent mutants:" if survivors else "no surviving non-equivalent mutants")
for name in survivors:
    print(f"    {name}: {status[name]}")
print(f"survival rate: {len(survivors)}/{considered} = {100 * len(survivors) / max(considered, 1):.1f}% "
      "of the non-equivalent mutants checked survived")
if seconds:
    loads = [float(x) for x in load_file.read_text().split()] if load_file and load_file.exists() else []
    load = f"; load average {min(loads):.1f}-{max(loads):.1f} (mean {sum(loads) / len(loads):.1f})" if loads else ""
    each = ("" if os.environ.get("KEEP") else  # with KEEP=1 some verdicts come from earlier runs
            f" ({len(checked)} mutants checked: {seconds / max(len(checked), 1):.2f} s wall and "
            f"{cpu_seconds / max(len(checked), 1):.2f} s CPU each)")
    print(f"time: {seconds // 60} min {seconds % 60} s wall, {cpu_seconds // 60} min {cpu_seconds % 60} s CPU"
          f"{each}{load}")
# mutmut's fork server logs each mutant's wall time (log_to_file in [tool.mutmut]): the slowest show where time goes.
log = Path("mutants/mutmut-debug.log")
if log.exists():
    took = dict(re.findall(r"Completed (\S+): exit=-?\d+ \(([\d.]+)s\)", log.read_text(errors="replace")))
    slowest = sorted(took.items(), key=lambda item: -float(item[1]))[:5]
    print("slowest mutants (wall s, last time each ran): " + ", ".join(f"{name} {float(s):.1f}" for name, s in slowest))
