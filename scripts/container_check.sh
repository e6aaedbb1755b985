#!/usr/bin/env bash
# Builds the container image on a machine without a Docker engine or a registry image, runs its production stack and
# checks it over HTTP (issue #18). Not in CI: 16-24 minutes on a shared 2-core machine; it needs 30 GB of free disk.
#
#   sudo bash scripts/container_check.sh          # from the repository root of a clone; root for mmdebstrap/buildah
#
# How, step by step (each bounded by a timeout; any failure stops the script with a non-zero status):
#  1. a Debian bookworm base (python3, venv, CA certificates) made by mmdebstrap, imported as a local image;
#  2. the Dockerfile built FROM it by buildah (vfs storage, chroot isolation, --format docker to keep HEALTHCHECK),
#     with torch from this machine's pip sources (see PIP_INDEXES below) bind-mounted into the build;
#  3. the image's own CMD run with `buildah run` (podman run cannot set RLIMIT_NPROC here) inside a network namespace
#     that has only loopback, so anything the stack tried to download would fail: it must get ready and caption
#     with no network at all;
#  4. checks: /readyz, a sample photo captioned over HTTP (JSON checked), the image's HEALTHCHECK command, every
#     serving process's user, the files written at run time, a graceful SIGTERM stop, and the image size.
# Everything it makes lives in $WORK (its own container storage) and is removed at the end unless KEEP=1.
#
# Settings (environment):
#   WORK=/var/tmp/captioner-container-check   scratch folder: container storage, base tarball
#   PIP_INDEXES="/opt/pypi /opt/pypi-more"     local pip mirrors (folders with simple/), bind-mounted at the same path
#   TORCH_INDEX_URL=https://pypi.org/simple    where torch comes from (PyPI's and the mirror's torch is a CUDA build)
#   CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt  the host's CA bundle, for pip's HTTPS inside the build
#   KEEP=1                                     keep the image and the storage (remove them later: rm -rf $WORK)
#   SKIP_BUILD=1                               check the image an earlier KEEP=1 run left in $WORK (steps 3-5 only)
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-/var/tmp/captioner-container-check}
PIP_INDEXES=${PIP_INDEXES:-/opt/pypi /opt/pypi-more}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
KEEP=${KEEP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
BASE=localhost/captioner-base:bookworm
IMAGE=localhost/captioner:check
SAMPLE=captioner/samples/cat.jpg
# The bundled model's answer for the sample (caption and first tag): the one copy, in the samples' table of
# captions, which tests/test_default_model.py checks against the model's own output (so it follows every new model).
EXPECTED_CAPTION=$(sed -n 's/^| `cat\.jpg` | \([^|]*[^ |]\) | [^|]* |$/\1/p' captioner/samples/LICENSES.md)
EXPECTED_TAG=$(sed -n 's/^| `cat\.jpg` | .*(first tag: "\([^"]*\)" [0-9.]*) |$/\1/p' captioner/samples/LICENSES.md)
STORAGE=(--root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)

step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

[ -n "$EXPECTED_CAPTION" ] || fail "no caption for $SAMPLE in captioner/samples/LICENSES.md"
[ -n "$EXPECTED_TAG" ] || fail "no first tag for $SAMPLE in captioner/samples/LICENSES.md"
[ "$(id -u)" = 0 ] || fail "run as root (mmdebstrap and buildah's chroot isolation need it)"
for tool in mmdebstrap buildah podman curl unshare ip python3; do
    if ! command -v "$tool" >/dev/null; then
        step "installing podman buildah mmdebstrap runc (apt)"
        { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq \
            podman buildah mmdebstrap runc curl iproute2; } >/dev/null || fail "could not install the container tools"
        break
    fi
done

CONTAINER=""
SERVER_PID=""
# Every process of the running stack carries this in its environment (set on the container below), so it can be
# found by process id, and only it: the check's own processes do not have it.
MARK="$$-$(date +%s%N)"
stack_pids() { { grep -l -s -a "CAPTIONER_CHECK_MARK=$MARK" /proc/[0-9]*/environ || true; } | cut -d/ -f3 | paste -sd' '; }
STARTED_AT=$(date +%s)
cleanup() {
    status=$?
    set +e
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"; sleep 5; kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    # Whatever still runs of the stack (a stuck worker) gets SIGTERM, then SIGKILL, by its process id.
    pids=$(stack_pids)
    if [ -n "$pids" ]; then
        echo "stopping leftover stack processes: $pids" >&2
        kill -TERM $pids 2>/dev/null; sleep 10; pids=$(stack_pids); [ -z "$pids" ] || kill -KILL $pids 2>/dev/null
    fi
    if [ -n "$CONTAINER" ]; then
        buildah "${STORAGE[@]}" umount "$CONTAINER" >/dev/null 2>&1
        buildah "${STORAGE[@]}" rm "$CONTAINER" >/dev/null 2>&1
    fi
    if [ "$KEEP" = 1 ]; then
        echo "kept: $IMAGE in $WORK/storage (buildah ${STORAGE[*]} images)"
    else
        buildah "${STORAGE[@]}" rm --all >/dev/null 2>&1
        buildah "${STORAGE[@]}" rmi --all --force >/dev/null 2>&1
        rm -rf "$WORK"
    fi
    echo
    if [ "$status" = 0 ]; then echo "container check PASSED in $(( $(date +%s) - STARTED_AT )) s"
    else echo "container check FAILED (status $status) after $(( $(date +%s) - STARTED_AT )) s" >&2; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$SKIP_BUILD" = 1 ]; then
    buildah "${STORAGE[@]}" inspect --type image "$IMAGE" >/dev/null || fail "SKIP_BUILD=1: no $IMAGE in $WORK"
else
    step "disk"
    mkdir -p "$WORK"
    free_gb=$(df -P --block-size=1G "$WORK" | awk 'NR == 2 {print $4}')
    echo "$free_gb GB free under $WORK"
    [ "$free_gb" -ge 30 ] || fail "need 30 GB free under $WORK (vfs storage copies every layer)"

    step "1. Debian base with mmdebstrap"
    timeout 900 mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
        "$WORK/rootfs.tar" http://deb.debian.org/debian || fail "mmdebstrap"
    timeout 600 podman "${STORAGE[@]}" import --quiet "$WORK/rootfs.tar" "$BASE" >/dev/null || fail "podman import"
    rm -f "$WORK/rootfs.tar"
    ok "base image $BASE"

    step "2. build the image with buildah"
    build_args=(--build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    pip_args="--cert /etc/ssl/host-ca.crt"
    volumes=(-v "$CA_BUNDLE:/etc/ssl/host-ca.crt:ro")
    for index in $PIP_INDEXES; do
        [ -d "$index/simple" ] || continue
        pip_args+=" --extra-index-url file://$index/simple"
        volumes+=(-v "$index:$index:ro")
    done
    build_started=$(date +%s)
    timeout --kill-after=30 3600 buildah "${STORAGE[@]}" bud --isolation chroot --format docker --layers=false \
        "${build_args[@]}" --build-arg "PIP_EXTRA_ARGS=$pip_args" "${volumes[@]}" -t "$IMAGE" . \
        > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "buildah bud (log above)"; }
    ok "built $IMAGE in $(( $(date +%s) - build_started )) s"
fi

step "image configuration"
config=$(buildah "${STORAGE[@]}" inspect --type image "$IMAGE")
python3 - "$config" <<'EOF' || fail "image configuration"
import json, sys
config = json.loads(sys.argv[1])["Docker"]["config"]
print("User:", config["User"], "| Cmd:", config["Cmd"], "| ExposedPorts:", sorted(config.get("ExposedPorts") or {}))
print("Healthcheck:", config["Healthcheck"]["Test"][1:][-1][:60] + "...")
assert config["User"] == "captioner", "the image must run as the non-root user captioner"
assert config["Cmd"] == ["captioner", "serve", "--production"], config["Cmd"]
assert "/readyz" in " ".join(config["Healthcheck"]["Test"]), "HEALTHCHECK must probe /readyz"
EOF
ok "non-root USER, the production stack as CMD, HEALTHCHECK on /readyz"

step "3. run the image's CMD in a network namespace with only loopback"
CONTAINER=$(buildah "${STORAGE[@]}" from --quiet "$IMAGE")
PORT=8000  # the image's CAPTIONER_BIND; the new network namespace has its own ports, so it is free there
mapfile -t CMD < <(python3 -c 'import json, sys; [print(a) for a in json.loads(sys.argv[1])["Docker"]["config"]["Cmd"]]' "$config")
# The image's CMD, as its USER, with its environment; the one addition is the marker that finds its processes.
buildah "${STORAGE[@]}" config --env "CAPTIONER_CHECK_MARK=$MARK" "$CONTAINER"
# Everything below runs in one new network namespace: the stack, the HTTP client and the checks.
export CONTAINER PORT SAMPLE EXPECTED_CAPTION EXPECTED_TAG WORK
export STORAGE_ARGS="${STORAGE[*]}"
export RUN_STARTED=$(date +%s)
cat > "$WORK/run_checks.sh" <<'EOF'
set -euo pipefail
ip link set lo up
echo "network namespace: $(ip -brief link | awk '{print $1}' | paste -sd' ') (no route out: $(ip route | wc -l) routes)"
python3 -c 'import socket; socket.getaddrinfo("pypi.org", 443)' 2>/dev/null && { echo "FAIL: DNS works here"; exit 1; }
buildah $STORAGE_ARGS run --isolation chroot "$CONTAINER" -- "$@" < /dev/null > "$WORK/serve.log" 2>&1 &
server=$!
echo "started: buildah run ... $* (pid $server)"
ready=""
for _ in $(seq 1 300); do  # up to ~5 minutes: two workers load the model on a busy 2-core machine
    kill -0 "$server" 2>/dev/null || { tail -20 "$WORK/serve.log"; echo "FAIL: the stack exited"; exit 1; }
    if curl -sf -m 5 "http://127.0.0.1:$PORT/readyz" > "$WORK/readyz.json"; then ready=1; break; fi
    sleep 1
done
[ -n "$ready" ] || { tail -20 "$WORK/serve.log"; echo "FAIL: /readyz not 200 within 300 s"; exit 1; }
echo "ok: /readyz 200 after $SECONDS s: $(head -c 200 "$WORK/readyz.json")"

curl -sS -m 60 -o "$WORK/caption.json" -w '%{http_code}\n' -F "image=@$SAMPLE" \
    "http://127.0.0.1:$PORT/v1/captions" > "$WORK/caption.status"
python3 - <<'PY'
import json, os
status = open(os.path.join(os.environ["WORK"], "caption.status")).read().strip()
body = json.load(open(os.path.join(os.environ["WORK"], "caption.json")))
assert status == "200", f"HTTP {status}: {body}"
captions = body["captions"]
assert captions and all(isinstance(c["text"], str) and c["text"] for c in captions), body
top, tag = captions[0]["text"], body["tags"][0]["label"]
print(f"ok: POST /v1/captions {os.environ['SAMPLE']}: 200, {len(captions)} caption(s), best {top!r}"
      f" (log_prob {captions[0]['log_prob']}), first tag {tag!r} ({body['tags'][0]['probability']}),"
      f" options {body['options']}, timing_ms {body['timing_ms']}")
assert top == os.environ["EXPECTED_CAPTION"], f"caption {top!r}, expected {os.environ['EXPECTED_CAPTION']!r}"
assert tag == os.environ["EXPECTED_TAG"], f"tag {tag!r}, expected {os.environ['EXPECTED_TAG']!r}"
PY

# The HEALTHCHECK's own command, run in the same container as docker would (its exit status is the health).
mapfile -t health < <(buildah $STORAGE_ARGS inspect --type container "$CONTAINER" | python3 -c \
    'import json, sys; [print(a) for a in json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"][1:]]')
timeout 30 buildah $STORAGE_ARGS run --isolation chroot "$CONTAINER" -- "${health[@]}" < /dev/null \
    || { echo "FAIL: HEALTHCHECK command failed"; exit 1; }
echo "ok: the image's HEALTHCHECK command exits 0"

# Every process of the stack: the descendants of `buildah run`, with their real and effective users.
python3 - "$server" <<'PY'
import os, sys
children = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
    except OSError:
        continue
    children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append((int(pid), status, cmdline))
todo, serving = [int(sys.argv[1])], []
while todo:
    for pid, status, cmdline in children.get(todo.pop(), []):
        todo.append(pid)
        if not os.path.basename(cmdline.split(" ")[0]).startswith("buildah"):  # buildah's own chroot helpers
            serving.append((pid, status["Uid"].split(), cmdline))
for pid, uids, cmdline in serving:
    print(f"  pid {pid:>7} uid {'/'.join(uids[:2])} {cmdline[:100]}")
kinds = {"supervisor": "serve --production", "gunicorn": "gunicorn", "nginx": "nginx"}
for kind, needle in kinds.items():
    assert any(needle in cmdline for _, _, cmdline in serving), f"no {kind} process found"
assert all(set(uids) == {"10001"} for _, uids, _ in serving), "a serving process is not uid 10001"
supervisor = [pid for pid, _, cmdline in serving if "serve --production" in cmdline]
open(os.path.join(os.environ["WORK"], "supervisor.pid"), "w").write(f"{supervisor[0]}\n")
print(f"ok: {len(serving)} serving processes (supervisor, gunicorn master and workers, nginx master and workers),"
      " all uid 10001 (captioner), real and effective")
PY

# Graceful stop: SIGTERM to the supervisor (the CMD's process), which stops nginx and gunicorn.
kill -TERM "$(cat "$WORK/supervisor.pid")"
wait "$server" && echo "ok: SIGTERM -> the stack stopped, exit status 0" || { echo "FAIL: exit status $?"; exit 1; }
EOF
timeout --kill-after=30 900 unshare --net bash "$WORK/run_checks.sh" "${CMD[@]}" &
SERVER_PID=$!
wait "$SERVER_PID" || fail "the run checks (above)"
SERVER_PID=""
for _ in $(seq 1 10); do [ -z "$(stack_pids)" ] && break; sleep 1; done
[ -z "$(stack_pids)" ] || fail "processes of the stack still run after it stopped: $(stack_pids)"
ok "no process of the stack is left"

step "4. files written at run time (nothing downloaded)"
root=$(timeout 300 buildah "${STORAGE[@]}" mount "$CONTAINER")
timeout 300 python3 - "$root" <<'EOF' || fail "files written at run time"
import os, sys, time
root = sys.argv[1]
since = float(os.environ.get("RUN_STARTED", "0"))
written = []
for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if os.path.join(folder, d) not in (os.path.join(root, p) for p in ("proc", "sys", "dev"))]
    for name in files:
        path = os.path.join(folder, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if info.st_mtime >= since:
            written.append((path[len(root):], info.st_size))
for path, size in sorted(written):
    print(f"  {size:>10} {path}")
weights = [p for p, _ in written if p.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar"))]
assert not weights, f"weights appeared at run time: {weights}"
assert not any(p.startswith(("/tmp/torch/hub", "/opt/venv")) for p, _ in written), "downloads or installs at run time"
print(f"ok: {len(written)} files written at run time, none of them weights, none under /opt/venv or TORCH_HOME/hub")
EOF

step "5. image size"
timeout 60 podman "${STORAGE[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"
timeout 300 buildah "${STORAGE[@]}" run --isolation chroot "$CONTAINER" -- sh -c 'cd /opt/venv/lib/python3*/site-packages &&
    python -c "import sys, torch; print(\"python\", sys.version.split()[0], sys.base_prefix, \"torch\", torch.__version__)"
    for d in /opt/venv nvidia torch triton openvino onnxruntime cv2 scipy captioner; do [ -e $d ] && du -sh $d; done
    true' < /dev/null
