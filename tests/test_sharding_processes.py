"""Sharding across processes: each shard is chosen in a separate process, as on N machines or torchrun ranks.

Python's ``hash()`` of a string differs between processes (``PYTHONHASHSEED``), so a shard assignment built on it
agrees with itself inside one process and nowhere else: tests that pick every shard in one process cannot see it.
Here two processes with different hash seeds each take their share of 1,000 paths: every path must land in exactly
one share, and in the one this (third) process computes.

The child processes load ``captioner/batch/inputs.py`` (the code ``captioner caption --shard`` runs) on its own, with
its one package import stubbed out: importing the whole package (torch) takes 10-15 s per process on a loaded 2-core
machine, this takes a fraction of a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from captioner.batch import Shard

INPUTS_PY = Path(__file__).resolve().parents[1] / "captioner" / "batch" / "inputs.py"

CHILD = """
import importlib.util, json, sys, types
for name in ("captioner", "captioner.batch"):
    package = types.ModuleType(name)
    package.__path__ = []
    sys.modules[name] = package
distributed = types.ModuleType("captioner.distributed")
distributed.Launch = None  # only Shard.from_env reads it
sys.modules["captioner.distributed"] = distributed
spec = importlib.util.spec_from_file_location("captioner.batch.inputs", sys.argv[1])
inputs = sys.modules["captioner.batch.inputs"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inputs)
paths = json.load(sys.stdin)
index, count = map(int, sys.argv[2].split("/"))
print(json.dumps(inputs.Shard(index, count).select(paths)))
"""

PATHS = [f"photos/{day:03d}/IMG_{i:04d}.jpg" for day in range(10) for i in range(100)]  # 1,000 paths


def _shard_in_a_process(shard: str, hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(INPUTS_PY), shard], input=json.dumps(PATHS), env=env,
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(done.stdout)


def test_shards_chosen_in_processes_with_different_hash_seeds_partition_the_inputs() -> None:
    first = _shard_in_a_process("0/2", "1")
    second = _shard_in_a_process("1/2", "2")
    assert len(set(first)) == len(first) and len(set(second)) == len(second)
    assert not set(first) & set(second)  # no path in both shards
    assert set(first) | set(second) == set(PATHS)  # none in neither
    assert 400 < len(first) < 600  # a roughly even split
    assert first == Shard(0, 2).select(PATHS)  # and the same split as this process' (its own hash seed)
    # The same shard asked again under another seed: the same paths.
    assert _shard_in_a_process("0/2", "3") == first


def test_three_shards_across_processes() -> None:
    shares = [_shard_in_a_process(f"{i}/3", str(10 + i)) for i in range(3)]
    assert sorted(p for share in shares for p in share) == sorted(PATHS)
    assert all(250 < len(share) < 420 for share in shares)
