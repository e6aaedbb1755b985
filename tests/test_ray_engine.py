"""``captioner caption --engine ray``: 60 images (3 broken) in a real S3-compatible server (moto, loopback) are
captioned by the command's own local Ray instance, which is killed part-way, then resumed on a real Ray cluster
(``ray start --head``, 2 CPUs, loopback): no duplicates, no gaps, and the records equal the local engine's. The
actor class is also checked in-process (calling it needs no Ray).

Ray, pyarrow and boto run only in subprocesses (the head, moto and the ``captioner`` command); those tests skip
without them.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import varied_tiny_model
from PIL import Image
from ray_processes import (
    HAVE_RAY,
    HAVE_S3,
    MotoServer,
    RayHead,
    assert_same_records,
    ray_env,
    run_captioner,
    short_temp_dir,
    start_captioner,
    stop_group,
)

from captioner.api import Captioner
from captioner.batch import discover_images, error_record
from captioner.batch.ray_engine import CaptionImages, preprocess_batch
from captioner.checkpoint import save_model
from captioner.cli import main

# Broken in ways whose error message names no file (the same read from a path or from S3 bytes).
BROKEN = {"broken/truncated.jpg", "broken/damaged.png", "broken/text.jpg"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model whose captions differ per image, so that a mix-up between images would show."""
    return save_model(varied_tiny_model(), tmp_path_factory.mktemp("models") / "varied")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """57 random-noise JPEGs and PNGs and 3 broken files: 60 images."""
    root = tmp_path_factory.mktemp("ray-photos")
    (root / "good").mkdir()
    (root / "broken").mkdir()
    for i in range(57):
        pixels = np.random.default_rng(i).integers(0, 256, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "good" / f"{i:03d}.{'png' if i % 5 == 0 else 'jpg'}")
    (root / "broken/truncated.jpg").write_bytes((root / "good/001.jpg").read_bytes()[:300])
    (root / "broken/damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    (root / "broken/text.jpg").write_text("not an image")
    return root


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def local_records(photos: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The local engine's records (in-process, no Ray), by image."""
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    status = main(["caption", str(photos), "-r", "--model", str(model_dir), "--runtime", "torch", "--workers", "0",
                   "--out", str(out), "-q"])
    assert status == 1  # the broken files
    records = _records(out)
    assert len(records) == 60
    return {r["image"]: r for r in records}


# --- in-process: the public actor class on plain numpy batches -------------------------------------------------------


def test_caption_images_class_gives_the_batch_commands_records(photos: Path, model_dir: Path,
                                                                local_records: dict[str, dict]) -> None:
    paths = discover_images([str(photos / "good")])[:6] + [str(photos / "broken/text.jpg")]
    captioner_class = CaptionImages(str(model_dir), runtime="torch")
    # From paths alone (a user's own pipeline), and from preprocess_batch's output (the command's two stages).
    by_paths = captioner_class({"image": np.array(paths, dtype=object)})
    staged = preprocess_batch({"image": np.array(paths, dtype=object)}, Captioner.load(model_dir).preprocess_config)
    assert staged["pixels"].shape == (7, 3, 64, 64) and staged["error"][-1].startswith("not_an_image")
    by_stages = captioner_class(staged)
    for output in (by_paths, by_stages):
        records = [json.loads(text) for text in output["record"]]
        assert records == [local_records[p] for p in paths]
        assert list(output["caption"]) == [r.get("caption", "") for r in records]
        assert list(output["error"]) == [r.get("error", "") for r in records]
    assert json.loads(by_paths["record"][-1]) == error_record(paths[-1], local_records[paths[-1]]["error"])


def test_ray_flags_need_the_ray_engine(photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["caption", str(photos), "--actors", "2"]) == 2
    assert "need --engine ray" in capsys.readouterr().err


# --- a real Ray cluster, images in a real S3-compatible server --------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(photos: Path) -> Iterator[MotoServer]:
    """The 60 images in s3://photos/ray/ on a moto server."""
    if not (HAVE_RAY and HAVE_S3):
        pytest.skip("ray, s3fs and moto[server] are not installed (pip install 'captioner[ray,dev]')")
    server = MotoServer()
    try:
        server.wait_ready()
        files = {p.relative_to(photos).as_posix(): p for p in sorted(photos.rglob("*")) if p.is_file()}
        server.upload("photos", {f"ray/{name}": path for name, path in files.items()})
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ray_head(bucket: MotoServer) -> Iterator[RayHead]:
    """``ray start --head`` with 2 CPUs (started without the AWS variables: the command hands them to its job)."""
    head = RayHead(num_cpus=2)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


def test_ray_engine_captions_s3_like_the_local_engine_and_resumes_after_a_kill(
    bucket: MotoServer, ray_head: RayHead, photos: Path, model_dir: Path, local_records: dict[str, dict],
    tmp_path: Path,
) -> None:
    out = tmp_path / "ray.jsonl"
    args = ["caption", "s3://photos/ray/", "-r", "--model", model_dir, "--runtime", "torch", "--engine", "ray",
            "--actor-batch-size", "4", "--workers", "1", "--out", out]

    # 1. Without --ray-address the command starts its own local Ray; it is killed (SIGKILL, no clean-up, its Ray
    # processes with it) once some batches are written.
    temp_dir = short_temp_dir("rayk")
    first = start_captioner(args, {**ray_env(temp_dir), **bucket.env}, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 8:
                break
            time.sleep(0.02)
        assert first.poll() is None, f"the run ended before it could be killed: {first.stderr.read().decode()}"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        stop_group(first, grace=5.0)
        shutil.rmtree(temp_dir, ignore_errors=True)
    written = out.read_bytes()
    done_before = written.count(b"\n")
    assert 8 <= done_before < 60

    # 2. --resume on the cluster (--ray-address) finishes the job.
    status, stderr = run_captioner([*args, "--resume", "--ray-address", ray_head.address],
                                   {**ray_head.env, **bucket.env}, cwd=tmp_path)
    assert status == 1, stderr  # 1: the broken files have error records
    assert f"{done_before} already in" in stderr
    records = _records(out)
    images = [r["image"] for r in records]
    assert len(images) == len(set(images)) == 60  # no duplicates, no gaps
    assert out.read_bytes().startswith(written[: written.rfind(b"\n") + 1])  # earlier records kept as they were
    # The same records as the local engine on the local copies (Ray's come in completion order).
    by_name = {r["image"].removeprefix("s3://photos/ray/"): {**r, "image": ""} for r in records}
    expected = {Path(i).relative_to(photos).as_posix(): {**r, "image": ""} for i, r in local_records.items()}
    assert_same_records(by_name, expected)
    assert {name for name, r in expected.items() if "error" in r} == BROKEN


def test_without_ray_the_ray_engine_is_a_usage_error(
    photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import captioner.caption_command as command

    real = command.importlib.util.find_spec
    monkeypatch.setattr(command.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    assert main(["caption", str(photos), "--engine", "ray"]) == 2
    assert "pip install 'captioner[ray]'" in capsys.readouterr().err
