"""Run the service under a real gunicorn, as a child process on a free loopback port (tests and benchmarks).

A test harness, not part of the service: it lives in ``tests/`` (benchmarks put this folder on ``sys.path``).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUNICORN_CONF = REPO / "service" / "gunicorn.conf.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class GunicornServer:
    """``gunicorn -c service/gunicorn.conf.py`` with the given settings; logs go to files in ``log_dir``.

    The child gets this environment minus any ``CAPTIONER_*``/``PROMETHEUS_*`` variables, plus ``env``; call
    :meth:`wait_ready`, then :meth:`request`, and :meth:`stop` (SIGTERM, then SIGKILL) at the end.
    """

    def __init__(
        self, model_dir: str | Path | None, log_dir: Path, workers: int = 1, threads: int = 4,
        env: dict[str, str] | None = None, graceful_timeout: int = 10, app: str = "service.app:create_app()",
    ) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / "access.log"
        self.stderr_path = log_dir / "error.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTIONER_", "PROMETHEUS_"))}
        environ["PROMETHEUS_MULTIPROC_DIR"] = str(log_dir / "metrics")
        if model_dir is not None:
            environ["CAPTIONER_MODEL"] = str(model_dir)
        environ |= env or {}
        command = [
            sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "-b", f"{self.host}:{self.port}",
            "-w", str(workers), "--threads", str(threads), "--graceful-timeout", str(graceful_timeout),
            app,
        ]
        self._stdout = open(self.stdout_path, "wb")  # noqa: SIM115 - closed in stop()
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(command, cwd=REPO, env=environ, stdout=self._stdout, stderr=self._stderr)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until /readyz answers 200 (the worker's model is loaded and warm)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.stderr_path.read_text()}")
            try:
                if self.request("GET", "/readyz", timeout=5).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gunicorn not ready after {timeout} s:\n{self.stderr_path.read_text()}")

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, timeout: float = 60.0,
    ) -> Response:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body or None, headers=headers or {})
            response = connection.getresponse()
            return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), then SIGKILL if it does not exit in ``timeout`` seconds; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stdout.close()
        self._stderr.close()
        return self.process.returncode

    def access_log(self) -> list[dict]:
        """The JSON access log lines written so far."""
        lines = self.stdout_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]
