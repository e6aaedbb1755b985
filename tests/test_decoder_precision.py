"""The decoder's reduced precisions (``decoder_precision="int8"`` or ``"bfloat16"``): products close to float32's,
the same search, and the option in every door; float32 stays the default everywhere."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import captioner.fast_decoder as fast_module
from captioner.api import DEFAULT_MODEL_DIR, Captioner
from captioner.cli import main
from captioner.decoding import DecodingOptions, decode
from captioner.ensemble import DecoderEnsemble
from captioner.fast_decoder import (
    DECODER_PRECISIONS,
    Gemm,
    cpu_has_fast_bfloat16,
    fast_decoder,
    resolve_gemm_backend,
)
from service.config import Settings, load_settings

HAS_ONNXRUNTIME = all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))
needs_onnxruntime = pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="int8 decoding needs onnxruntime")
HAS_BFLOAT16 = cpu_has_fast_bfloat16()
needs_bfloat16 = pytest.mark.skipif(not HAS_BFLOAT16, reason="bfloat16 decoding needs a CPU with AMX or AVX-512 BF16")
# Each reduced precision, skipped where this machine cannot run it.
REDUCED = [pytest.param("int8", marks=needs_onnxruntime), pytest.param("bfloat16", marks=needs_bfloat16)]
SAMPLES = DEFAULT_MODEL_DIR.parents[1] / "samples"


def _relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    return ((found - expected).norm() / expected.norm()).item()


# Per reduced precision: who multiplies, and how close to float32 its products must come.
GEMM_TOLERANCE = {"int8": ("onnxruntime", 0.02), "bfloat16": ("torch", 0.01)}


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("rows", [0, 1, 7, 40])
def test_reduced_gemm_is_close_to_the_product(precision: str, rows: int) -> None:
    """An int8 ``Gemm`` (ONNX Runtime; 7-bit weights, 8-bit inputs) or a bfloat16 one (oneDNN's prepacked kernel;
    8-bit mantissas) adds its bias or the call's addend to ~``x @ weight``: within 2% and 1%, where float32 is
    exact to 1e-5; the bias is added in float32 and a column of zeros stays exactly zero."""
    backend, tolerance = GEMM_TOLERANCE[precision]
    generator = torch.Generator().manual_seed(11)
    weight, bias = torch.randn(64, 48, generator=generator), torch.randn(48, generator=generator)
    weight[:, 5] = 0.0
    x, addend = torch.randn(rows, 64, generator=generator), torch.randn(rows, 48, generator=generator)
    with torch.inference_mode():
        with_bias = Gemm(weight, bias, backend, precision)(x)
        with_addend = Gemm(weight, None, backend, precision)(x, addend)
    assert with_bias.shape == with_addend.shape == (rows, 48) and with_bias.dtype == torch.float32
    if rows == 0:
        return
    assert _relative_error(with_bias - bias, x @ weight) < tolerance
    assert _relative_error(with_addend - addend, x @ weight) < tolerance
    assert torch.equal(with_bias[:, 5], bias[5].expand(rows))
    assert not torch.allclose(with_bias, x @ weight + bias, atol=1e-5, rtol=0)  # it really is another product


def test_bfloat16_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 runs in torch: on a CPU only where it multiplies bfloat16 natively (else a ValueError says so, and
    a Captioner asking for it fails at load), on GPUs always; never in ONNX Runtime."""
    cpu = torch.device("cpu")
    assert "bfloat16" in DECODER_PRECISIONS
    assert resolve_gemm_backend("auto", torch.device("cuda"), torch.float32, "bfloat16") == "torch"
    with pytest.raises(ValueError, match="in torch: the onnxruntime backend was asked for"):
        resolve_gemm_backend("onnxruntime", cpu, torch.float32, "bfloat16")
    monkeypatch.setattr(fast_module, "_cpuinfo", lambda field: "fpu avx2 avx512f" if field == "flags" else "")
    assert not cpu_has_fast_bfloat16()
    with pytest.raises(ValueError, match="no bfloat16 matrix kernels"):
        resolve_gemm_backend("auto", cpu, torch.float32, "bfloat16")
    with pytest.raises(ValueError, match="no bfloat16 matrix kernels"):
        Captioner(tiny_model(seed=2), runtime="torch", decoder_precision="bfloat16")
    monkeypatch.setattr(fast_module, "_cpuinfo", lambda field: "fpu avx512f amx_bf16" if field == "flags" else "")
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert resolve_gemm_backend("auto", cpu, torch.float32, "bfloat16") == "torch"


def test_precision_choice() -> None:
    """float32 is the default and runs anywhere; int8 needs ONNX Runtime on the CPU and says so; unknown names raise."""
    cpu = torch.device("cpu")
    assert resolve_gemm_backend("auto", cpu) == resolve_gemm_backend("auto", cpu, torch.float32, "float32")
    assert DECODER_PRECISIONS == ("float32", "bfloat16", "int8")
    with pytest.raises(ValueError, match="unknown decoder precision 'int4'"):
        resolve_gemm_backend("auto", cpu, torch.float32, "int4")
    if not HAS_ONNXRUNTIME:
        with pytest.raises(ValueError, match="in ONNX Runtime on the CPU: onnxruntime and onnx are not installed"):
            resolve_gemm_backend("auto", cpu, torch.float32, "int8")
        return
    assert resolve_gemm_backend("auto", cpu, torch.float32, "int8") == "onnxruntime"
    with pytest.raises(ValueError, match="in ONNX Runtime on the CPU: the weights are torch.float32 on cuda"):
        resolve_gemm_backend("auto", torch.device("cuda"), torch.float32, "int8")
    with pytest.raises(ValueError, match="the weights are torch.float64 on cpu"):
        resolve_gemm_backend("auto", cpu, torch.float64, "int8")
    with pytest.raises(ValueError, match="the torch backend was asked for"):
        resolve_gemm_backend("torch", cpu, torch.float32, "int8")


def test_int8_without_onnxruntime_fails_when_the_captioner_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for int8 where ONNX Runtime is missing fails at load, naming what is missing, not at the first image."""
    real = importlib.util.find_spec
    monkeypatch.setattr(fast_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ValueError, match="onnxruntime and onnx are not installed"):
        Captioner(tiny_model(seed=2), runtime="torch", decoder_precision="int8")
    assert Captioner(tiny_model(seed=2), runtime="torch").decoder_precision == "float32"


@pytest.mark.parametrize("precision", REDUCED)
def test_reduced_step_is_close_to_float32_and_decodes(precision: str) -> None:
    """The int8 or bfloat16 fast step's logits stay within 5% of float32's; the search runs on it unchanged (beam
    and greedy: every image gets its captions, best first)."""
    model = tiny_model(conditioning="attention", cell="lstm", seed=7)
    decoder, vocab = model.decoder.eval(), model.vocab
    grid = torch.randn(4, 1280, 2, 2, generator=torch.Generator().manual_seed(3))
    exact, reduced = fast_decoder(decoder), fast_decoder(decoder, "auto", precision)
    assert (exact.precision, reduced.precision) == ("float32", precision) and exact is not reduced
    assert fast_decoder(decoder, "auto", precision) is reduced  # cached per precision
    with torch.inference_mode():
        tokens = torch.tensor([vocab.start] * 4)
        steps = []
        for fast in (exact, reduced):
            memory, state = fast.memory_and_state(grid)
            steps.append(fast.step(tokens, state, memory)[0])
    assert 0 < _relative_error(steps[1], steps[0]) < 0.05
    for options in (DecodingOptions(strategy="beam", beam_size=3, num_captions=3, max_length=8),
                    DecodingOptions(strategy="greedy", max_length=8)):
        results = decode(decoder, grid, vocab, options, precision)
        assert [len(hyps) for hyps in results] == [options.num_captions] * 4
        for hyps in results:
            assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        # decode() really stepped the reduced products: float32's log-probabilities are not theirs.
        exact_results = decode(decoder, grid, vocab, options)
        assert [h.log_prob for hs in results for h in hs] != [h.log_prob for hs in exact_results for h in hs]


@pytest.mark.parametrize("precision", REDUCED)
def test_ensemble_members_decode_in_the_asked_precision(precision: str) -> None:
    """An ensemble's members all step in the precision decode() is given."""
    members = [tiny_model(seed=seed).decoder for seed in (1, 2)]
    ensemble = DecoderEnsemble(members).eval()
    assert [m.precision for m in ensemble.steps(precision).members] == [precision, precision]
    assert [m.precision for m in ensemble.steps().members] == ["float32", "float32"]
    grid = torch.randn(2, 1280, 2, 2, generator=torch.Generator().manual_seed(4))
    results = decode(ensemble, grid, tiny_model(seed=1).vocab, DecodingOptions(max_length=6), precision)
    assert len(results) == 2 and all(results)


@pytest.mark.parametrize("precision", REDUCED)
def test_precision_option_in_every_door(
    precision: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Captioner.load``, ``captioner caption`` / ``evaluate`` / ``serve`` (``--decoder-precision``), the service's
    ``CAPTIONER_DECODER_PRECISION`` and the Ray actors all reach decode() with the precision asked for; a bad value
    is a usage error (exit 2) or a settings error naming it."""
    seen: list[str] = []
    original = fast_module.FastDecoder.__init__

    def spy(self: object, decoder: object, gemm: str = "auto", precision: str = "float32") -> None:
        seen.append(precision)
        original(self, decoder, gemm, precision)

    monkeypatch.setattr(fast_module.FastDecoder, "__init__", spy)
    fast_module._CACHE.clear()
    photo = sorted(SAMPLES.glob("*.jpg"))[0]

    captioner = Captioner.load(tiny_model_dir, runtime="torch", decoder_precision=precision)
    assert captioner.caption(photo)[0] and seen == [precision]

    seen.clear()
    out = tmp_path / f"{precision}.jsonl"
    assert main(["caption", str(photo), "--model", str(tiny_model_dir), "--runtime", "torch", "--decoder-precision",
                 precision, "--out", str(out), "--workers", "0", "--quiet"]) == 0  # fmt: skip
    assert seen == [precision] and json.loads(out.read_text().splitlines()[0])["caption"]
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(photo), "--model", str(tiny_model_dir), "--decoder-precision", "fp16"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--annotations", str(tmp_path / "none.json"), "--decoder-precision", "fp16"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err

    assert load_settings(environ={}).decoder_precision == "float32"
    assert load_settings(environ={"CAPTIONER_DECODER_PRECISION": precision}).decoder_precision == precision
    with pytest.raises(ValueError, match="decoder_precision must be one of float32, bfloat16, int8, got 'fp16'"):
        Settings(decoder_precision="fp16")
    from service.app import create_app
    from service.routes.common import ENGINE_KEY

    seen.clear()
    app = create_app({"model": str(tiny_model_dir), "load_in_background": False, "runtime": "torch",
                      "decoder_precision": precision})  # fmt: skip
    try:
        assert app.extensions[ENGINE_KEY].captioner.decoder_precision == precision
        ready = app.test_client().get("/readyz").get_json()
        assert (ready["runtime"], ready["decoder_precision"]) == ("torch", precision)  # what the worker runs, shown
        response = app.test_client().post("/v1/captions", data=photo.read_bytes(), content_type="image/jpeg")
        assert response.status_code == 200, response.get_data(as_text=True)
        assert precision in seen
    finally:
        app.extensions[ENGINE_KEY].close()

    from service import production

    passed: dict[str, str] = {}
    monkeypatch.setattr(production, "serve", lambda bind, environ: passed.update(environ) or 0)
    assert main(["serve", "--production", "--runtime", "torch", "--decoder-precision", precision]) == 0
    assert passed["CAPTIONER_DECODER_PRECISION"] == precision and passed["CAPTIONER_RUNTIME"] == "torch"

    from captioner.batch.ray_engine import CaptionImages, RaySettings

    assert RaySettings().decoder_precision == "float32"
    actor = CaptionImages(str(tiny_model_dir), runtime="torch", decoder_precision=precision)
    assert actor.captioner.decoder_precision == precision
