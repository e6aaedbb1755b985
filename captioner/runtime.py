"""Inference runtimes for the encoder: PyTorch (the reference) or a compiled graph in OpenVINO or ONNX Runtime.

The CNN encoder is ~75% of a caption's cost, and PyTorch eager runs it at a fraction of what the CPU can do. A
runtime turns images (B, 3, size, size) into the same feature grid (B, C, h, w) as ``Encoder`` (within 1e-4);
the decoder always runs in PyTorch. Measured on the 2-core AVX-512 development machine (README, "Runtimes"):
OpenVINO (f32) is fastest, then ONNX Runtime, then PyTorch eager, so ``"auto"`` picks the first one installed that
supports the device. Training always uses the PyTorch encoder.

The graph is derived from the model directory, never shipped: the encoder is exported to ONNX on first use and
cached in ``$CAPTIONER_CACHE_DIR`` (default ``~/.cache/captioner``) under a key made of the encoder's weights (a
sha256 of its tensors), the input size and the exporter's and runtime's versions. The cached file's own sha256 is
recorded beside it and checked on every load, so a damaged file is rebuilt, not trusted; writes are atomic. Where
no cache directory is writable (a read-only install), the graph is exported to a temporary file and dropped.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from captioner.atomic import atomic_write_bytes
from captioner.encoder import Encoder

if TYPE_CHECKING:  # optional: imported on first use
    import openvino

RUNTIMES = ("torch", "openvino", "onnxruntime")
AUTO = "auto"
RUNTIME_CHOICES = (AUTO, *RUNTIMES)  # what --runtime and CAPTIONER_RUNTIME accept
# Fastest first, as measured on CPU (README, "Runtimes"); "auto" takes the first that is installed.
CPU_PREFERENCE = ("openvino", "onnxruntime", "torch")
ONNX_OPSET = 17
_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


class EncoderRuntime(Protocol):
    """Images (B, 3, size, size) on the captioner's device -> feature grid (B, C, h, w), float32, same device."""

    name: str

    def __call__(self, images: Tensor) -> Tensor: ...


def installed(runtime: str) -> bool:
    """Whether ``runtime``'s package (and, for the compiled runtimes, the ONNX exporter's) is importable."""
    if runtime == "torch":
        return True
    needed = (_PACKAGES[runtime], "onnx")
    return all(importlib.util.find_spec(package) is not None for package in needed)


def runtime_version(runtime: str) -> str:
    """The installed version of ``runtime``'s package."""
    return torch.__version__ if runtime == "torch" else importlib.metadata.version(_PACKAGES[runtime])


def _supports(runtime: str, device: torch.device) -> bool:
    if runtime == "torch" or device.type == "cpu":
        return True
    if runtime == "onnxruntime" and device.type == "cuda":
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return False  # OpenVINO's devices are Intel CPUs and GPUs, not CUDA


def resolve_runtime(runtime: str | None, device: str | torch.device = "cpu") -> str:
    """The runtime to use: ``runtime`` itself (checked), or for ``"auto"``/None the fastest usable one.

    On CUDA ``"auto"`` is PyTorch: its f32 kernels are the reference there and the compiled runtimes would need
    ONNX Runtime's CUDA build.
    """
    device = torch.device(device)
    if runtime in (None, "", AUTO):
        preference = CPU_PREFERENCE if device.type == "cpu" else ("torch",)
        return next(r for r in preference if installed(r) and _supports(r, device))
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r} (expected one of {', '.join((AUTO, *RUNTIMES))})")
    if not installed(runtime):
        raise ValueError(
            f"runtime {runtime!r} is not installed: pip install {_PACKAGES[runtime]} onnx (see pyproject.toml)"
        )
    if not _supports(runtime, device):
        raise ValueError(f"runtime {runtime!r} does not run on device {device}; use --runtime torch")
    return runtime


class TorchRuntime:
    """The reference: the encoder module itself, in PyTorch eager mode."""

    name = "torch"

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def __call__(self, images: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.encoder(images)


class _CompiledRuntime:
    """Shared by the compiled runtimes: checks the input shape, moves tensors to numpy and back."""

    name = ""

    def __init__(self, image_size: int, device: torch.device) -> None:
        self.image_size = image_size
        self.device = device

    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise RuntimeError(  # what the torch encoder raises for a wrong shape, so callers see one error type
                f"the {self.name} encoder takes (batch, 3, {self.image_size}, {self.image_size}) images, "
                f"got {tuple(images.shape)}"
            )
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._run(array)).to(self.device)

    def _run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OpenVINORuntime(_CompiledRuntime):
    """The encoder's ONNX graph compiled by OpenVINO for the CPU, at f32 precision (the CPU's default may be bf16,
    which moves the grid by ~0.3)."""

    name = "openvino"

    def __init__(self, onnx_path: Path, image_size: int, device: torch.device) -> None:
        super().__init__(image_size, device)
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.compiled = openvino_core().compile_model(str(onnx_path), "CPU", config)

    def _run(self, images: np.ndarray) -> np.ndarray:
        request = self.compiled.create_infer_request()  # one per call: safe from several threads at once
        return np.array(request.infer({0: images})[0], copy=True)


@functools.cache
def openvino_core() -> openvino.Core:
    """The process's one OpenVINO ``Core``, never destroyed.

    Each Core's CPU plugin swaps the calling thread's signal alternate stack for one it maps itself, and unmaps it
    when the Core is destroyed, restoring the previous one only if its own is still current. Two Cores destroyed
    in the order they were made leave the thread with an unmapped alternate stack, and the next Python signal
    handler that runs on it (SIGCHLD after a DataLoader with workers, SIGTERM, SIGINT) kills the process with
    SIGSEGV. One Core that lives as long as the process never unmaps it (tests/test_runtime.py pins this)."""
    import openvino

    return openvino.Core()


class OnnxRuntimeRuntime(_CompiledRuntime):
    """The encoder's ONNX graph in ONNX Runtime (CPU provider, or CUDA with the onnxruntime-gpu build)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, image_size: int, device: torch.device) -> None:
        super().__init__(image_size, device)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=providers)

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": images})[0]


def weights_digest(encoder: Encoder) -> str:
    """sha256 of the encoder's tensors (names, shapes, dtypes, values): what the exported graph is derived from."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where exported graphs are cached: ``$CAPTIONER_CACHE_DIR``, else ``$XDG_CACHE_HOME/captioner``, else
    ``~/.cache/captioner``."""
    if os.environ.get("CAPTIONER_CACHE_DIR"):
        return Path(os.environ["CAPTIONER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner"


def export_onnx(encoder: Encoder, image_size: int) -> bytes:
    """The encoder as an ONNX graph (input ``images`` (batch, 3, size, size), output ``grid``), dynamic batch."""
    module = copy.deepcopy(encoder.blocks).to("cpu").eval()  # a copy: the caller's encoder stays where it is
    example = torch.zeros(1, 3, image_size, image_size)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, not the user's concern
        torch.onnx.export(
            module, (example,), buffer, input_names=["images"], output_names=["grid"],
            dynamic_axes={"images": {0: "batch"}, "grid": {0: "batch"}}, opset_version=ONNX_OPSET,
            dynamo=False,  # the TorchScript exporter: no onnxscript, and it exports Lite0 in about a second
        )  # fmt: skip
    return buffer.getvalue()


def _cache_key(encoder: Encoder, image_size: int, runtime: str) -> str:
    parts = {
        "encoder": encoder.name, "weights": weights_digest(encoder), "size": image_size, "opset": ONNX_OPSET,
        "torch": torch.__version__, "runtime": runtime, "runtime_version": runtime_version(runtime),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cached_onnx(encoder: Encoder, image_size: int, runtime: str, root: Path | None = None) -> Path | None:
    """The exported graph's path in the cache, exported (atomically) if missing, damaged or stale.

    Returns None when the cache directory cannot be written (the caller exports to a temporary file instead).
    """
    root = cache_dir() if root is None else root
    graph = root / "encoders" / f"{encoder.name}-{_cache_key(encoder, image_size, runtime)}.onnx"
    recorded = graph.with_suffix(".onnx.sha256")
    try:
        if graph.is_file() and recorded.is_file():
            if hashlib.sha256(graph.read_bytes()).hexdigest() == recorded.read_text().strip():
                return graph
    except OSError:
        pass  # unreadable: rebuilt below
    data = export_onnx(encoder, image_size)
    try:
        atomic_write_bytes(graph, data)
        atomic_write_bytes(recorded, (hashlib.sha256(data).hexdigest() + "\n").encode())
    except OSError:
        return None
    return graph


def _compiled(runtime: str, onnx_path: Path, image_size: int, device: torch.device) -> EncoderRuntime:
    cls = OpenVINORuntime if runtime == "openvino" else OnnxRuntimeRuntime
    return cls(onnx_path, image_size, device)


def load_runtime(
    encoder: Encoder, image_size: int, runtime: str | None = AUTO, device: str | torch.device = "cpu"
) -> EncoderRuntime:
    """The encoder in ``runtime`` (see :func:`resolve_runtime`), for images of ``image_size`` pixels square."""
    device = torch.device(device)
    name = resolve_runtime(runtime, device)
    if name == "torch":
        return TorchRuntime(encoder)
    graph = cached_onnx(encoder, image_size, name)
    if graph is not None:
        return _compiled(name, graph, image_size, device)
    with tempfile.TemporaryDirectory(prefix="captioner-encoder-") as tmp:  # read-only cache: use and drop
        path = Path(tmp) / "encoder.onnx"
        path.write_bytes(export_onnx(encoder, image_size))
        return _compiled(name, path, image_size, device)
