"""Real processes for the Ray engine and object-storage tests, each in its own process group on loopback.

Ray, pyarrow and boto never load in the pytest process: a ``ray start --head --block`` head, a ``moto_server`` and
the ``captioner`` command run as subprocesses, and every one is stopped (its whole process group, by id) at the end.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from gunicorn_process import free_port

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
HAVE_RAY = importlib.util.find_spec("ray") is not None and (VENV_BIN / "ray").exists()
HAVE_S3 = importlib.util.find_spec("s3fs") is not None and (VENV_BIN / "moto_server").exists()
# Fake credentials for moto: the usual AWS variables, as a user would set them.
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def ray_env(temp_dir: Path) -> dict[str, str]:
    """The environment of every Ray process of a test: its own auth token and temp dir (nothing in ~/.ray or
    /tmp/ray), no usage stats, one torch thread, this checkout first on the path."""
    env = dict(os.environ)
    env.update({
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USAGE_DISABLED": "1",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        "RAY_TMPDIR": str(temp_dir), "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    })
    return env


def short_temp_dir(prefix: str) -> Path:
    """A short folder under /tmp: Ray's unix socket paths must stay under 107 characters."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is in process group ``pgid`` (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group of ``process`` (started with ``start_new_session``), then SIGKILL what is left
    after ``grace`` seconds; returns when the group is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()  # reap the leader
            if not _group_alive(process.pid):
                break
            time.sleep(0.1)
        if not _group_alive(process.pid):
            break
    process.poll()


class RayHead:
    """``ray start --head --block`` on 127.0.0.1 with ``num_cpus`` CPUs; :attr:`address` for ``--ray-address``."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.temp_dir = short_temp_dir("rayt")
        self.env = ray_env(self.temp_dir)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = self.temp_dir / "head.log"
        ports = {"--port": self.port, "--ray-client-server-port": free_port(), "--dashboard-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
        command = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
                   "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
                   "--object-store-memory=300000000", "--disable-usage-stats",
                   *(f"{flag}={port}" for flag, port in ports.items())]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"ray start did not come up: {self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        stop_group(self.process, grace=5.0)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class MotoServer:
    """A real S3-compatible server (moto in server mode) on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.2)
        raise RuntimeError("moto_server did not come up")

    @property
    def env(self) -> dict[str, str]:
        """The usual AWS variables pointing at this server."""
        return {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def upload(self, bucket: str, files: dict[str, Path], timeout: float = 60.0) -> None:
        """Create ``bucket`` and put ``files`` (key -> local file) in it, from a short-lived subprocess."""
        script = (
            "import sys, s3fs\n"
            "fs = s3fs.S3FileSystem()\n"
            "bucket, pairs = sys.argv[1], sys.argv[2:]\n"
            "fs.mkdir(bucket)\n"
            "for key, path in zip(pairs[::2], pairs[1::2]):\n"
            "    fs.put_file(path, f'{bucket}/{key}')\n"
        )
        args = [arg for key, path in files.items() for arg in (key, str(path))]
        subprocess.run([sys.executable, "-c", script, bucket, *args], env={**os.environ, **self.env}, check=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        stop_group(self.process, grace=5.0)


def start_captioner(args: Sequence[str | Path], env: dict[str, str], cwd: Path, stdout: Path | None = None
                    ) -> subprocess.Popen:
    """The ``captioner`` console script in its own process group (so a test can kill it and what it started)."""
    return subprocess.Popen([str(VENV_BIN / "captioner"), *map(str, args)], env=env, cwd=cwd,
                            stdout=open(stdout, "wb") if stdout else subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def run_captioner(args: Sequence[str | Path], env: dict[str, str], cwd: Path, timeout: float = 240.0
                  ) -> tuple[int, str]:
    """Run ``captioner`` to the end (its process group is stopped however it ends); (exit status, stderr)."""
    process = start_captioner(args, env, cwd)
    try:
        _, stderr = process.communicate(timeout=timeout)
        return process.returncode, stderr.decode(errors="replace")
    finally:
        stop_group(process, grace=10.0)


def assert_same_records(got: dict[str, dict], expected: dict[str, dict]) -> None:
    """The same images, fields, captions and errors; log_prob and score equal up to float rounding (batched float32
    math may move the 4th decimal when images are batched differently)."""
    assert got.keys() == expected.keys()
    for image, record in got.items():
        want = expected[image]
        assert record.keys() == want.keys(), image
        assert (record.get("caption"), record.get("error")) == (want.get("caption"), want.get("error")), image
        for field in ("log_prob", "score"):
            if field in want:
                assert record[field] == pytest.approx(want[field], abs=2e-3), image
