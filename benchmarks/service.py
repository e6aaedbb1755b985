"""HTTP service benchmark: gunicorn on loopback, several concurrency levels, micro-batching on and off.

    .venv/bin/python benchmarks/service.py                       # the bundled model
    .venv/bin/python benchmarks/service.py --model path/to/model --requests 200 --concurrency 1,4,16
    .venv/bin/python benchmarks/service.py --runtimes torch,auto --batching on --concurrency 1,16
    .venv/bin/python benchmarks/service.py --runtimes torch,auto,auto+int8 --batching on --concurrency 1,16

With several ``--runtimes`` (CAPTIONER_RUNTIME of the workers; ``RUNTIME+PRECISION`` also sets their
CAPTIONER_DECODER_PRECISION) it also prints each one's requests/s and p50 latency as a ratio to the first's, level by
level, all measured in the same run.

For each setting of CAPTIONER_BATCHING (on, then off) it starts gunicorn (``service/gunicorn.conf.py``, 1 worker by
default), sends ``--requests`` caption requests at each concurrency level from that many client threads (each with
its own keep-alive connection) and prints requests/s, p50/p99 latency and the mean model batch size (from
/metrics). Then it compares one request at a time over HTTP with the in-process ``Captioner.caption`` on the same
image, which is the service's overhead (HTTP, multipart parsing, JSON, queueing).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the gunicorn test harness

from gunicorn_process import GunicornServer  # noqa: E402

from captioner.api import DEFAULT_MODEL_DIR, Captioner  # noqa: E402

DEFAULT_IMAGE = REPO / "captioner" / "samples" / "cat.jpg"


def multipart_body(image: bytes, filename: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + image + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def batch_totals(server: GunicornServer) -> tuple[float, float]:
    text = server.request("GET", "/metrics").body.decode()
    total = re.search(r"^captioner_batch_size_sum (\S+)", text, re.M)
    count = re.search(r"^captioner_batch_size_count (\S+)", text, re.M)
    return (float(total.group(1)) if total else 0.0), (float(count.group(1)) if count else 0.0)


def drive(server: GunicornServer, path: str, body: bytes, content_type: str, concurrency: int,
          requests: int) -> tuple[float, list[float], int]:
    """Send ``requests`` requests from ``concurrency`` threads; returns (seconds, latencies in ms, failures)."""
    latencies: list[float] = []
    failures = 0
    remaining = [requests]
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def client() -> None:
        nonlocal failures
        connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
        start.wait()
        while True:
            with lock:
                if remaining[0] == 0:
                    break
                remaining[0] -= 1
            began = time.perf_counter()
            connection.request("POST", path, body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            elapsed = (time.perf_counter() - began) * 1000.0
            with lock:
                latencies.append(elapsed)
                failures += response.status != 200
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, latencies, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"model directory (default: the bundled {DEFAULT_MODEL_DIR})")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="image to caption (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default: 64)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default: 1,4,16)")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers (default: 1)")
    parser.add_argument("--threads", type=int, default=16, help="gunicorn threads per worker (default: 16)")
    parser.add_argument("--strategy", default="beam", choices=["greedy", "beam"])
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="CAPTIONER_TORCH_THREADS of the workers and this process (default: cores / workers)")
    parser.add_argument("--single", type=int, default=20, help="sequential requests for the in-process comparison")
    parser.add_argument("--runtimes", default="auto",
                        help="comma-separated CAPTIONER_RUNTIME values, compared to the first; RUNTIME+int8 also "
                             "sets CAPTIONER_DECODER_PRECISION (default: auto)")
    parser.add_argument("--batching", default="on,off", help="CAPTIONER_BATCHING settings to run (default: on,off)")
    args = parser.parse_args(argv)

    model = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    if not (model / "config.json").is_file():
        parser.error(f"no model at {model}; pass --model DIR")
    image = Path(args.image).read_bytes()
    levels = [int(x) for x in args.concurrency.split(",")]
    path = f"/v1/captions?strategy={args.strategy}&beam_size={args.beam_size}"
    body, content_type = multipart_body(image, Path(args.image).name)

    # The in-process comparison uses as many torch threads as each worker does.
    torch.set_num_threads(args.torch_threads or max(1, (os.cpu_count() or 1) // args.workers))
    captioner = Captioner.load(model, allow_download=False)
    print(f"model {captioner.name} {captioner.version} ({model}), image {Path(args.image).name} ({len(image)} bytes), "
          f"{args.strategy} beam_size={args.beam_size}; gunicorn {args.workers} worker(s) x {args.threads} threads; "
          f"{args.requests} requests per level; torch threads per worker {torch.get_num_threads()}", flush=True)
    runtimes = args.runtimes.split(",")
    print(f"{'runtime':>11} {'batching':>8} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'mean batch':>10} {'errors':>6}")
    single_http: dict[tuple[str, str], float] = {}
    measured: dict[tuple[str, str, int], tuple[float, float]] = {}  # (runtime, batching, clients) -> req/s, p50
    env = {"CAPTIONER_TORCH_THREADS": str(args.torch_threads)} if args.torch_threads else {}
    for runtime, batching in ((r, b) for r in runtimes for b in args.batching.split(",")):
        with tempfile.TemporaryDirectory(prefix="captioner-bench-") as logs:
            encoder_runtime, _, precision = runtime.partition("+")
            server = GunicornServer(model, Path(logs), workers=args.workers, threads=args.threads,
                                    env=env | {"CAPTIONER_BATCHING": batching, "CAPTIONER_RUNTIME": encoder_runtime,
                                               "CAPTIONER_DECODER_PRECISION": precision or "float32"})
            try:
                server.wait_ready()
                drive(server, path, body, content_type, 2, 4)  # warm-up: connections, allocator, caches
                for clients in levels:
                    before = batch_totals(server)
                    seconds, latencies, failures = drive(server, path, body, content_type, clients, args.requests)
                    after = batch_totals(server)
                    batches = after[1] - before[1]
                    mean_batch = (after[0] - before[0]) / batches if batches else float("nan")
                    measured[runtime, batching, clients] = len(latencies) / seconds, percentile(latencies, 50)
                    print(f"{runtime:>11} {batching:>8} {clients:>7} {len(latencies) / seconds:>8.1f} "
                          f"{percentile(latencies, 50):>8.1f} {percentile(latencies, 99):>8.1f} "
                          f"{mean_batch:>10.2f} {failures:>6}", flush=True)
                _, latencies, _ = drive(server, path, body, content_type, 1, args.single)
                single_http[runtime, batching] = statistics.median(latencies)
            finally:
                server.stop()

    options = {"strategy": args.strategy, "beam_size": args.beam_size}
    captioner.caption(image, **options)  # warm-up
    in_process = []
    for _ in range(args.single):
        began = time.perf_counter()
        captioner.caption(image, **options)
        in_process.append((time.perf_counter() - began) * 1000.0)
    median = statistics.median(in_process)
    print(f"single request, median of {args.single}: in-process Captioner.caption ({captioner.encode.name}) "
          f"{median:.1f} ms; " + "; ".join(f"HTTP {r} batching {b} {v:.1f} ms (+{v - median:.1f})"
                                           for (r, b), v in single_http.items()))
    for runtime in runtimes[1:]:  # each runtime against the first, level by level
        base = runtimes[0]
        for (r, batching, clients), (rps, p50) in measured.items():
            if r == runtime and (base, batching, clients) in measured:
                base_rps, base_p50 = measured[base, batching, clients]
                print(f"{runtime} / {base}, batching {batching}, {clients:>2} clients: "
                      f"requests/s {rps / base_rps:.2f}x, p50 latency {p50 / base_p50:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
