"""Run ``captioner serve --production`` (nginx + gunicorn) as a child process on a free loopback port, and slow
clients against it (tests and benchmarks)."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from gunicorn_process import free_port

CAPTIONER = Path(sys.executable).parent / "captioner"


class ProductionStack:
    """``captioner serve --production --bind 127.0.0.1:PORT``; its log goes to ``log_dir/stack.log``."""

    def __init__(self, model_dir: Path | None, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "stack.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTIONER_", "PROMETHEUS_"))}
        environ |= {"CAPTIONER_WORKERS": "1", "CAPTIONER_THREADS": "4", "CAPTIONER_TORCH_THREADS": "1"} | (env or {})
        command = [str(CAPTIONER), "serve", "--production", "--bind", f"{self.host}:{self.port}"]
        if model_dir is not None:
            command += ["--model", str(model_dir)]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, env=environ, stdout=self._log, stderr=subprocess.STDOUT)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                timeout: float = 30.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body or None, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the stack exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if self.request("GET", "/readyz", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"not ready after {timeout} s:\n{self.log_path.read_text()}")

    def child_pids(self) -> dict[str, int]:
        """The nginx and gunicorn master pids the supervisor logged."""
        match = re.search(r"nginx pid (\d+)\) -> gunicorn pid (\d+)", self.log_path.read_text())
        assert match, self.log_path.read_text()
        return {"nginx": int(match.group(1)), "gunicorn": int(match.group(2))}

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class SlowClients:
    """``headers`` connections that send their request headers one byte every ``interval`` s and ``bodies`` that send
    their (declared 1 MB) body the same way; a dropped connection is reopened, as an attacker would."""

    def __init__(self, host: str, port: int, headers: int, bodies: int, interval: float = 2.0) -> None:
        self.host, self.port, self.interval = host, port, interval
        self.stop = threading.Event()
        self.reconnects = 0
        self.threads = [threading.Thread(target=self._run, args=(False,), daemon=True) for _ in range(headers)]
        self.threads += [threading.Thread(target=self._run, args=(True,), daemon=True) for _ in range(bodies)]

    def __enter__(self) -> SlowClients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.interval + 5)

    def _run(self, body: bool) -> None:
        while not self.stop.is_set():
            try:
                with socket.create_connection((self.host, self.port), timeout=5) as sock:
                    if body:
                        sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                     b"Content-Length: 1000000\r\n\r\n")
                        trickle = b"\xff" * 1000000
                    else:
                        trickle = b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 4000
                    for byte in trickle:
                        if self.stop.wait(self.interval):
                            return
                        sock.sendall(bytes([byte]))
            except OSError:
                self.reconnects += 1
                self.stop.wait(0.1)
