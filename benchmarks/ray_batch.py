"""The Ray engine against the local engine of ``captioner caption``, side by side in one run on the same images.

  (1) 2 CPUs: ``captioner caption`` (local engine: DataLoader workers + the model in one process) against
      ``captioner caption --engine ray`` (its own local Ray instance: Ray Data tasks read, one model actor);
  (2) simulated scale-out: N local-engine shards (``--shard I/N``, each ``--workers 1`` and one torch thread, all at
      once) against N Ray model actors with one CPU each on a ``ray start --head`` cluster.

Every run is the real command in a subprocess, writing JSON lines. For each it prints the end-to-end rate (images
over the command's whole wall time: start-up included) and the steady rate (images written between the first and
the last records, from polling the output files every 0.1 s: start-up excluded, so it is the engine's throughput),
and the Ray/local ratios. The records of every run are checked to be the same set of images.

    .venv/bin/python benchmarks/ray_batch.py                       # 240 Flickr8k photos, bundled model
    .venv/bin/python benchmarks/ray_batch.py --images 64 --scale 2 --model path/to/model

Needs ``pip install 'captioner[ray]'``. Nothing is left running: every process group it starts is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ray_processes import RayHead, stop_group  # noqa: E402

FLICKR8K_IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"
CAPTIONER = Path(sys.executable).parent / "captioner"


def run_commands(commands: list[list[str]], outs: list[Path], env: dict[str, str], timeout: float) -> dict:
    """Run ``commands`` at once, polling their output files; their wall time and the steady rate."""
    start = time.perf_counter()
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, start_new_session=True) for c in commands]
    samples: list[tuple[float, int]] = []
    try:
        while any(p.poll() is None for p in processes):
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"{commands[0][:4]}... ran over {timeout} s")
            lines = sum(out.read_bytes().count(b"\n") for out in outs if out.exists())
            samples.append((time.perf_counter() - start, lines))
            time.sleep(0.1)
        wall = time.perf_counter() - start
    finally:
        for process in processes:
            stop_group(process, grace=10.0)
    for process in processes:
        if process.returncode not in (0, 1):
            raise RuntimeError(f"exit {process.returncode}: {process.stderr.read().decode()[-2000:]}")
    records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    total = len(records)
    samples.append((wall, total))
    first = next((t, n) for t, n in samples if n > 0)
    last = next((t, n) for t, n in samples if n == total)
    steady = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")
    return {"wall": wall, "images": total, "end_to_end": total / wall, "steady": steady,
            "first_record_s": first[0], "names": sorted(r["image"] for r in records)}


def show(name: str, result: dict) -> None:
    print(f"{name:<44} {result['images']:>6} {result['wall']:>8.1f} {result['first_record_s']:>9.1f} "
          f"{result['end_to_end']:>10.2f} {result['steady']:>9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=240, help="how many Flickr8k photos (sorted by name)")
    parser.add_argument("--folder", type=Path, default=FLICKR8K_IMAGES)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--scale", type=int, default=2, help="N for the scale-out comparison (0: skip it)")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest one run may take (s)")
    args = parser.parse_args()

    photos = sorted(args.folder.glob("*.jpg"))[: args.images]
    if len(photos) < args.images:
        sys.exit(f"{args.folder} has {len(photos)} JPEGs, fewer than --images {args.images}")
    work = Path(tempfile.mkdtemp(prefix="raybench", dir="/tmp"))
    (work / "photos").mkdir()
    for photo in photos:
        (work / "photos" / photo.name).symlink_to(photo)
    common = [str(CAPTIONER), "caption", str(work / "photos"), "--batch-size", str(args.batch_size), "-q"]
    if args.model:
        common += ["--model", str(Path(args.model).resolve())]
    token = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USAGE_DISABLED": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": str(work)}
    try:
        with open("/proc/loadavg") as f:
            load_before = f.read().split()[:3]
        print(f"{len(photos)} photos from {args.folder}; model {args.model or 'bundled'}; batch {args.batch_size}; "
              f"{os.cpu_count()} CPUs; load average before {' '.join(load_before)}")
        print(f"{'run':<44} {'images':>6} {'wall s':>8} {'first s':>9} {'end-to-end':>10} {'steady':>9}  (img/s)")
        results = {}

        def timed(name: str, commands: list[list[str]], outs: list[Path], run_env: dict[str, str]) -> dict:
            results[name] = run_commands(commands, outs, run_env, args.timeout)
            show(name, results[name])
            return results[name]

        # Warm-up (not timed): the encoder's runtime graph is exported once into the cache that every run shares.
        subprocess.run([*common[:2], str(photos[0]), *common[3:]], env=env, check=True, timeout=args.timeout,
                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        # (1) 2 CPUs, each engine with its defaults.
        local = timed("local engine (2 workers)", [[*common, "--out", str(work / "local.jsonl")]],
                      [work / "local.jsonl"], env)
        ray = timed("ray engine, local instance (1 actor)",
                    [[*common, "--engine", "ray", "--out", str(work / "ray.jsonl")]], [work / "ray.jsonl"], env)
        print(f"ray / local: end-to-end {ray['end_to_end'] / local['end_to_end']:.2f}x, "
              f"steady {ray['steady'] / local['steady']:.2f}x")

        # (2) Scale-out: N one-CPU shards of the local engine against N one-CPU Ray actors.
        if args.scale:
            n = args.scale
            one_thread = {**env, "OMP_NUM_THREADS": "1"}
            outs = [work / f"shard{i}.jsonl" for i in range(n)]
            shards = timed(f"local engine, {n} shards x (1 worker, 1 thread)",
                           [[*common, "--shard", f"{i}/{n}", "--workers", "1", "--out", str(out)]
                            for i, out in enumerate(outs)], outs, one_thread)
            head = RayHead(num_cpus=n + 1)  # N actors + one CPU of preprocessing tasks
            try:
                head.wait_ready()
                head_env = {**head.env, "PYTHONPATH": env["PYTHONPATH"]}
                actors = timed(f"ray cluster ({n + 1} CPUs), {n} actors x 1 CPU",
                               [[*common, "--engine", "ray", "--ray-address", head.address, "--actors", str(n),
                                 "--actor-cpus", "1", "--workers", "1", "--out", str(work / "actors.jsonl")]],
                               [work / "actors.jsonl"], head_env)
            finally:
                head.stop()
            print(f"ray {n} actors / {n} shards: end-to-end {actors['end_to_end'] / shards['end_to_end']:.2f}x, "
                  f"steady {actors['steady'] / shards['steady']:.2f}x (shards' steady rate starts at the first "
                  "shard's first record)")
        names = {name: r["names"] for name, r in results.items()}
        assert all(v == names["local engine (2 workers)"] for v in names.values()), "runs captioned other images"
        with open("/proc/loadavg") as f:
            print(f"every run captioned the same {len(photos)} images; load average after "
                  f"{' '.join(f.read().split()[:3])} (a shared machine: absolute rates move with its load)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
