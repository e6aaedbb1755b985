"""Encoder runtimes side by side, in one process: encoder, decoder, preprocessing and end-to-end speed.

For the bundled model (EfficientNet-Lite0 + attention LSTM) and each runtime installed for ``--device``, it prints:

* encoder images/s at batch 1 and 16, the max abs difference of its grid from PyTorch's, its achieved GFLOP/s
  (FLOPs counted by torch's FlopCounterMode) and that as a share of this machine's fp32 matmul peak, measured here
  with a large torch matmul (the physical reference);
* decoder images/s with the model's default decoding (beam 5, length penalty 1, no repeated trigrams) on the grids
  of ``--images`` photos, beside the decoder as it was at ``--baseline`` (a git commit; its model.py and
  decoding.py are loaded from git), with whether both give the same captions, and this tree's search stepping
  ``CaptionDecoder.step`` itself (without the inference fast path of ``captioner/fast_decoder.py``);
* preprocessing images/s (read + decode + resize + normalise) on the photos and on a large JPEG (a sample upscaled
  to 4000x3000, as phones send), to compare with the encoder;
* end-to-end ``Captioner.caption`` images/s per runtime, its ratio to the torch runtime, and how many of the
  ``--images`` captions differ from the torch runtime's.

On CUDA (``--device cuda``) the runtimes are torch in f32, torch under bf16 and fp16 autocast, and ONNX Runtime's
CUDA provider when the onnxruntime-gpu build is installed; the script runs there unchanged.

Figures are medians of ``--repeats`` timed runs after a warm-up. On a machine shared with other work they are
noisy; the ratios, measured in the same run, are the comparison.

    .venv/bin/python benchmarks/runtime.py
    .venv/bin/python benchmarks/runtime.py --threads 2 --images 32 --repeats 5
    .venv/bin/python benchmarks/runtime.py --device cuda
    .venv/bin/python benchmarks/runtime.py --threads 1 --decoder-only --repeats 7
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.api import Captioner  # noqa: E402
from captioner.decoding import _decode_group, decode  # noqa: E402
from captioner.model import CaptionDecoder  # noqa: E402
from captioner.runtime import RUNTIMES, TorchRuntime, installed, resolve_runtime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k" / "images"
SAMPLES = ROOT / "captioner" / "samples"


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls (after one warm-up call) and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _once(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall time of one call (no warm-up) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def matmul_peak(device: torch.device, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """This machine's measured matmul GFLOP/s in ``dtype`` (square matrices large enough to reach the peak)."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = timed(lambda: a @ b, repeats, device)
    return 2 * n**3 / seconds / 1e9


class AutocastRuntime:
    """torch under CUDA autocast (bf16 or fp16), for the GPU comparison."""

    def __init__(self, captioner: Captioner, dtype: torch.dtype) -> None:
        self.inner = TorchRuntime(captioner.model.encoder)
        self.dtype = dtype
        self.name = f"torch-autocast-{str(dtype).removeprefix('torch.')}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=self.dtype):
            return self.inner(images).float()


def load_baseline_decoder(ref: str, captioner: Captioner) -> Callable[[torch.Tensor, object], list] | None:
    """``decode`` as it was at git commit ``ref``, on a decoder with the same weights; None without git or ref, and
    for an ensemble model (the bundled v4 and v5): that commit decoded one decoder."""
    if not isinstance(captioner.model.decoder, CaptionDecoder):
        return None
    modules = {}
    for name in ("model", "decoding"):
        try:
            source = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{ref}:captioner/{name}.py"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            return None
        source = source.replace("from captioner.model import", "from baseline_model import")
        module = types.ModuleType(f"baseline_{name}")
        sys.modules[module.__name__] = module
        exec(compile(source, f"{ref}:captioner/{name}.py", "exec"), module.__dict__)  # our own code, from git
        modules[name] = module
    model, decoding = modules["model"], modules["decoding"]
    decoder = model.CaptionDecoder(model.DecoderConfig(**captioner.model.decoder.config.to_json()))
    decoder.load_state_dict(captioner.model.decoder.state_dict())
    decoder.to(captioner.device).eval()
    known = decoding.DecodingOptions.__dataclass_fields__

    def run(grid: torch.Tensor, options: object) -> list:
        old_options = decoding.DecodingOptions(**{k: getattr(options, k) for k in known})
        return decoding.decode(decoder, grid, captioner.vocab, old_options)

    return run


def photos(count: int) -> list[Path]:
    """The first ``count`` Flickr8k photos when ../shared is present, else the sample photos repeated."""
    found = sorted(FLICKR.glob("*.jpg"))[:count] if FLICKR.is_dir() else []
    if not found:
        samples = sorted(SAMPLES.glob("*.jpg"))
        found = [samples[i % len(samples)] for i in range(count)]
    return found


def large_jpeg() -> bytes:
    """A sample photo upscaled to 4000x3000 and saved as a JPEG (quality 90): a phone-sized upload."""
    image = Image.open(sorted(SAMPLES.glob("*.jpg"))[0]).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def runtimes_for(device: torch.device) -> list[str]:
    names = [r for r in RUNTIMES if installed(r)]
    usable = []
    for name in names:
        try:
            resolve_runtime(name, device)
        except ValueError:
            continue
        usable.append(name)
    if device.type == "cuda":
        usable += ["torch-autocast-bfloat16", "torch-autocast-float16"]
    return usable


def make_captioner(reference: Captioner, name: str) -> Captioner:
    """A captioner sharing ``reference``'s model, with its encoder in runtime ``name``."""
    if name.startswith("torch-autocast-"):
        captioner = Captioner(reference.model, reference.device, runtime="torch")
        captioner.encode = AutocastRuntime(reference, getattr(torch, name.rsplit("-", 1)[1]))
        return captioner
    return Captioner(reference.model, reference.device, runtime=name)


def time_decoder(
    reference: Captioner, batch: torch.Tensor, options: object, args: argparse.Namespace, device: torch.device
) -> None:
    """Decoder images/s with ``options`` on the grids of ``batch``: this tree, the baseline commit, no fast path."""
    print("\ndecoder (default decoding)")
    grids = reference.encode(batch)

    def current() -> list:
        return decode(reference.model.decoder, grids, reference.vocab, options)

    def without_fast_path() -> list:  # this tree's search on CaptionDecoder.step itself
        with torch.inference_mode():
            return _decode_group(reference.model.decoder, grids, reference.vocab, options)

    baseline = load_baseline_decoder(args.baseline, reference)
    if baseline is None:
        t_new, new = timed(current, args.repeats, device)
        print(f"{'this tree':<24} {batch.size(0) / t_new:>9.1f} img/s  (baseline {args.baseline} not available)")
    else:
        # Alternate them, so load from other processes falls on both alike.
        times: dict[str, list[float]] = {"new": [], "old": [], "slow": []}
        new, old, slow = current(), baseline(grids, options), without_fast_path()
        for _ in range(args.repeats):
            for key, fn in (("new", current), ("old", lambda: baseline(grids, options)), ("slow", without_fast_path)):
                seconds, _ = _once(fn, device)
                times[key].append(seconds)
        t_new, t_old = statistics.median(times["new"]), statistics.median(times["old"])
        t_slow = statistics.median(times["slow"])

        def tokens(results: list) -> list:
            return [[h.tokens for h in hyps] for hyps in results]

        same = tokens(new) == tokens(old)
        print(f"{'this tree':<24} {batch.size(0) / t_new:>9.1f} img/s")
        print(f"{'at ' + args.baseline:<24} {batch.size(0) / t_old:>9.1f} img/s   this tree / baseline: "
              f"{t_old / t_new:.2f}x, same captions: {same}")  # fmt: skip
        print(f"{'without the fast path':<24} {batch.size(0) / t_slow:>9.1f} img/s   this tree / it: "
              f"{t_slow / t_new:.2f}x, same captions: {tokens(slow) == tokens(new)}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch (and runtime) threads; default: torch's")
    parser.add_argument("--images", type=int, default=32, help="photos for the decoder and end-to-end figures")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default="f483925", help="git commit whose decoder is the 'before' figure")
    parser.add_argument("--decoder-only", action="store_true", help="only the decoder figures")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    reference = Captioner.load(device=device, allow_download=False, runtime="torch")
    options = reference.options()
    names = runtimes_for(device)
    print(f"device {device}, {torch.get_num_threads()} threads, runtimes {', '.join(names)}, decoding {options}")
    files = photos(args.images)
    batch = torch.stack([reference.load_tensor(p) for p in files]).to(device)
    if args.decoder_only:
        time_decoder(reference, batch, options, args, device)
        return
    peak = matmul_peak(device, args.repeats)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        size = reference.preprocess_config.size
        reference.model.encoder(torch.zeros(1, 3, size, size, device=device))
    gflop = counter.get_total_flops() / 1e9
    print(f"fp32 matmul peak: {peak:.0f} GFLOP/s; encoder: {gflop:.2f} GFLOP per image")

    batch16 = batch[:16]
    captioners = {name: make_captioner(reference, name) for name in names}

    print("\nencoder")
    header = f"{'b1 img/s':>9} {'b16 img/s':>10} {'vs torch':>9} {'GFLOP/s':>8} {'% peak':>7} {'max diff':>9}"
    print(f"{'runtime':<24} {header}")
    torch_grid = reference.encode(batch16)
    base16 = None
    for name, captioner in captioners.items():
        t1, _ = timed(lambda c=captioner: c.encode(batch16[:1]), args.repeats * 4, device)
        t16, grid = timed(lambda c=captioner: c.encode(batch16), args.repeats, device)
        rate16 = len(batch16) / t16
        base16 = base16 or rate16
        diff = (grid.float() - torch_grid).abs().max().item()
        print(f"{name:<24} {1 / t1:>9.1f} {rate16:>10.1f} {rate16 / base16:>8.2f}x {rate16 * gflop:>8.1f} "
              f"{100 * rate16 * gflop / peak:>6.1f}% {diff:>9.1e}")  # fmt: skip

    time_decoder(reference, batch, options, args, device)

    print("\npreprocessing (read, decode, resize, normalise; one process)")
    t_small, _ = timed(lambda: [reference.load_tensor(p) for p in files], args.repeats, torch.device("cpu"))
    big = large_jpeg()
    t_big, _ = timed(lambda: [reference.load_tensor(big) for _ in range(4)], args.repeats, torch.device("cpu"))
    print(f"{'dataset photos':<24} {len(files) / t_small:>9.1f} img/s")
    print(f"{'4000x3000 JPEG':<24} {4 / t_big:>9.1f} img/s ({len(big) / 1e6:.1f} MB)")

    print(f"\nend to end: Captioner.caption on {len(files)} photos")
    texts = {}
    base = None
    for name, captioner in captioners.items():
        seconds, results = timed(lambda c=captioner: c.caption(files), max(1, args.repeats // 2), device)
        texts[name] = [r[0].text for r in results]
        rate = len(files) / seconds
        base = base or rate
        differ = sum(a != b for a, b in zip(texts[name], texts[names[0]], strict=True))
        print(f"{name:<24} {rate:>9.1f} img/s {rate / base:>6.2f}x   captions differing from torch: {differ}")


if __name__ == "__main__":
    main()
