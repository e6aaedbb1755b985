"""``captioner serve --production``: nginx in front of gunicorn, started and stopped together.

gunicorn's sync and threaded workers are easily tied up by slow clients (a connection that sends its headers one byte
every few seconds holds a worker thread the whole time), so, as gunicorn's deployment guide advises, a buffering
reverse proxy faces the clients: nginx reads each request's headers and whole body (with timeouts and a size limit)
before it hands the request to gunicorn over a private unix socket, and answers malformed or over-limit requests
itself, with the API's JSON error shape. nginx runs as the current user from a private temporary prefix (its config,
pid file and temp folders; its error log goes to stderr), so no system configuration is touched.

Stopping: SIGTERM or Ctrl-C (SIGINT) stops both gracefully (nginx finishes in-flight requests, gunicorn lets its
workers finish theirs); if either process dies, the other is stopped too; both children get SIGKILL if this
supervisor is killed (Linux parent-death signal), so nothing is left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import grp
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from service.config import Settings, load_settings

log = logging.getLogger("service.production")

GUNICORN_CONF = Path(__file__).resolve().parent / "gunicorn.conf.py"
NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx", "/usr/local/sbin/nginx")
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ProxyLimits:
    """What nginx allows a client: header and body read timeouts (seconds) and the largest body (bytes)."""

    header_timeout_s: int = 10
    body_timeout_s: int = 10  # between two reads of the body, as nginx counts it
    send_timeout_s: int = 30
    upstream_timeout_s: int = 90  # a caption waits at most CAPTIONER_REQUEST_TIMEOUT_S for the model
    max_body_bytes: int = Settings().max_batch_upload_bytes  # the largest route limit; each route checks its own


# The errors nginx answers itself (malformed requests, limits, gunicorn unreachable) as the API's JSON errors.
# 494 is nginx's "request header too large", sent to the client as 431. Errors from gunicorn pass through untouched.
NGINX_ERRORS = {
    400: (400, "bad_request", "malformed request"),
    408: (408, "request_timeout", "the request was not received in time"),
    413: (413, "payload_too_large", "request body is larger than the limit of {max_body_bytes} bytes"),
    414: (414, "uri_too_long", "request line too long"),
    494: (431, "headers_too_large", "request headers too large"),
    500: (500, "internal_error", "internal proxy error"),
    502: (503, "unavailable", "the service is starting or stopping; retry shortly"),
    503: (503, "unavailable", "the service is overloaded; retry shortly"),
    504: (504, "upstream_timeout", "the service did not answer in time"),
}


def nginx_binary() -> str | None:
    """The nginx executable (Debian puts it in /usr/sbin, often not on a user's PATH), or None."""
    for name in NGINX_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _listen(bind: str) -> str:
    """nginx's ``listen`` argument for ``HOST:PORT`` (``[::1]:8000`` for IPv6, a bare port for all addresses)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--bind {bind!r}: expected HOST:PORT, e.g. 0.0.0.0:8000")
    return f"{host or '0.0.0.0'}:{port}"


def nginx_config(bind: str, socket_path: Path, prefix: Path, limits: ProxyLimits, user: str | None) -> str:
    """The whole nginx.conf of the proxy: JSON errors, buffering, timeouts, body limit, upstream on a unix socket."""
    error_pages = "".join(
        f"        error_page {nginx_status} ={status} /__errors/{nginx_status}.json;\n"
        for nginx_status, (status, _code, _message) in NGINX_ERRORS.items()
    )
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                           "scgi"))
    return f"""# Written by service/production.py for one run; the prefix folder is removed on exit.
{f"user {user};" if user else ""}
worker_processes auto;
pid {prefix / "nginx.pid"};
error_log stderr warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;  # gunicorn writes the JSON access log of every request it answers
    server_tokens off;
{temp}
    client_header_timeout {limits.header_timeout_s}s;
    client_body_timeout {limits.body_timeout_s}s;
    send_timeout {limits.send_timeout_s}s;
    keepalive_timeout 30s;
    client_max_body_size {limits.max_body_bytes};
    client_body_buffer_size 1m;
    large_client_header_buffers 4 8k;

    upstream captioner {{
        server unix:{socket_path};
        keepalive 32;
    }}

    server {{
        listen {_listen(bind)} default_server;

        location / {{
            proxy_pass http://captioner;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_request_buffering on;  # the whole body is read here before gunicorn sees the request
            proxy_buffering on;
            proxy_connect_timeout 5s;
            proxy_read_timeout {limits.upstream_timeout_s}s;
            proxy_send_timeout {limits.upstream_timeout_s}s;
        }}

{error_pages}
        location /__errors/ {{  # the bodies of the errors above, written by write_error_pages()
            internal;
            root {prefix};
            default_type application/json;
            add_header X-Content-Type-Options nosniff always;
        }}
    }}
}}
"""


def write_error_pages(prefix: Path, limits: ProxyLimits) -> None:
    """``prefix/__errors/STATUS.json``: the JSON bodies nginx sends for the errors it answers itself."""
    folder = prefix / "__errors"
    folder.mkdir()
    for nginx_status, (_status, code, message) in NGINX_ERRORS.items():
        text = message.format(max_body_bytes=limits.max_body_bytes)
        (folder / f"{nginx_status}.json").write_text(json.dumps({"error": {"code": code, "message": text}}) + "\n")


def _die_with_parent() -> None:
    """Runs in each child before exec: SIGKILL it when this supervisor dies, whatever kills it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_for_socket(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with status {process.returncode} before it listened")
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn did not create {path} within {timeout:g} s")
        time.sleep(0.1)


def _stop(processes: dict[str, subprocess.Popen], timeout: float) -> None:
    """Graceful stop (nginx: SIGQUIT, gunicorn: SIGTERM), then SIGKILL for whatever is still running."""
    graceful = {"nginx": signal.SIGQUIT, "gunicorn": signal.SIGTERM}
    for name, process in processes.items():
        if process.poll() is None:
            process.send_signal(graceful[name])
    deadline = time.monotonic() + timeout
    for name, process in processes.items():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %g s; killing it", name, timeout)
            process.kill()
            process.wait()


def serve(bind: str, environ: dict[str, str] | None = None, limits: ProxyLimits | None = None) -> int:
    """Run nginx on ``bind`` in front of gunicorn (``service/gunicorn.conf.py``) until SIGTERM/SIGINT or until
    either exits; returns the exit status (0 after a requested stop). ``environ`` adds ``CAPTIONER_*`` settings."""
    nginx = nginx_binary()
    if nginx is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx); it is needed for --production")
    env = os.environ | (environ or {})
    settings = load_settings(environ=env)  # fail here, in one line, on a bad setting
    limits = limits or ProxyLimits(max_body_bytes=max(settings.max_upload_bytes, settings.max_batch_upload_bytes))
    listen = _listen(bind)
    prefix = Path(tempfile.mkdtemp(prefix="captioner-production-"))
    socket_path = prefix / "gunicorn.sock"
    user = None
    if os.geteuid() == 0:  # nginx workers drop root; they must reach the socket and the temp folders
        nobody = pwd.getpwnam("nobody")
        user = f"nobody {grp.getgrgid(nobody.pw_gid).gr_name}"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / kind).mkdir()
        if user:
            os.chown(prefix / kind, nobody.pw_uid, nobody.pw_gid)
    if user:
        os.chown(prefix, nobody.pw_uid, nobody.pw_gid)
    write_error_pages(prefix, limits)
    config = prefix / "nginx.conf"
    config.write_text(nginx_config(bind, socket_path, prefix, limits, user))

    stop_requested: list[int] = []

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    processes: dict[str, subprocess.Popen] = {}
    graceful_timeout = float(env.get("CAPTIONER_GRACEFUL_TIMEOUT", "30")) + 5
    status = 0
    try:
        # Own sessions: a terminal's Ctrl-C reaches this supervisor only, which stops both children gracefully.
        gunicorn_env = env | {"CAPTIONER_BIND": f"unix:{socket_path}"}
        processes["gunicorn"] = subprocess.Popen(  # its socket is private: it lies in this 0700 folder
            [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "-b", f"unix:{socket_path}",
             "service.app:create_app()"],
            env=gunicorn_env, start_new_session=True, preexec_fn=_die_with_parent,
        )
        _wait_for_socket(socket_path, processes["gunicorn"], timeout=120)
        processes["nginx"] = subprocess.Popen(
            [nginx, "-e", "stderr", "-p", str(prefix), "-c", str(config), "-g", "daemon off;"],
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        log.info("production stack on http://%s/ (nginx pid %d) -> gunicorn pid %d on %s", listen,
                 processes["nginx"].pid, processes["gunicorn"].pid, socket_path)
        while not stop_requested:
            exited = [name for name, process in processes.items() if process.poll() is not None]
            if exited:
                status = processes[exited[0]].returncode or 1
                log.error("%s exited with status %s; stopping the stack", exited[0], processes[exited[0]].returncode)
                break
            time.sleep(0.2)
    except RuntimeError as exc:
        log.error("%s", exc)
        status = 1
    finally:
        _stop(processes, graceful_timeout)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(prefix, ignore_errors=True)
    return status


def run_command(args: argparse.Namespace) -> int:
    """``captioner serve --production``: the stack on ``--bind``; a bad setting or a missing nginx is one line on
    stderr and exit status 2."""
    environ: dict[str, str] = {}
    if args.model is not None:
        environ["CAPTIONER_MODEL"] = str(Path(args.model).resolve())
    if args.device is not None:
        environ["CAPTIONER_DEVICE"] = args.device
    if args.no_batching:
        environ["CAPTIONER_BATCHING"] = "off"
    if args.runtime is not None:
        environ["CAPTIONER_RUNTIME"] = args.runtime
    if args.decoder_precision is not None:
        environ["CAPTIONER_DECODER_PRECISION"] = args.decoder_precision
    bind = args.bind or os.environ.get("CAPTIONER_BIND", "0.0.0.0:8000")
    try:
        return serve(bind, environ)
    except (FileNotFoundError, ValueError) as exc:
        print(f"captioner serve --production: {exc}", file=sys.stderr)
        return 2
