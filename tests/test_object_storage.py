"""Object-storage inputs (fsspec URLs) for both engines of ``captioner caption``.

In-process with fsspec's ``memory://`` filesystem (discovery, error records, the same captions as from files), then
against a real S3-compatible server (``moto_server`` on loopback, started here) with the usual AWS variables: the
local engine reads ``s3://`` inputs (the Ray engine's S3 run is in ``test_ray_engine.py``). boto and s3fs run only
in subprocesses; those tests skip when moto/s3fs are not installed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import varied_tiny_model
from PIL import Image
from ray_processes import HAVE_S3, MotoServer, assert_same_records, run_captioner

from captioner.batch import discover_images, image_key, path_exists
from captioner.checkpoint import save_model
from captioner.cli import main
from captioner.storage import is_url

fsspec = pytest.importorskip("fsspec")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(varied_tiny_model(), tmp_path_factory.mktemp("models") / "varied")


@pytest.fixture(scope="module")
def shoot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five photos (one in a sub-folder), a broken JPEG and a text file, as local files."""
    root = tmp_path_factory.mktemp("shoot")
    (root / "sub").mkdir()
    for i, name in enumerate(["a.jpg", "b.PNG", "c.jpeg", "d.jpg", "sub/e.jpg"]):
        pixels = np.random.default_rng(100 + i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name, format="PNG" if name.endswith("PNG") else "JPEG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    (root / "notes.txt").write_text("no image extension: not listed from a folder")
    return root


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def file_records(shoot: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The local engine's records for the local files, by name relative to the folder."""
    out = tmp_path_factory.mktemp("files") / "files.jsonl"
    assert main(["caption", str(shoot), "-r", "--model", str(model_dir), "--runtime", "torch", "--workers", "0",
                 "--out", str(out), "-q"]) == 1
    return {Path(r["image"]).relative_to(shoot).as_posix(): r for r in _records(out)}


def _renamed(records: list[dict], prefix: str) -> dict[str, dict]:
    """Records by name relative to ``prefix``, with ``image`` and file names in errors spelled that way too, so they
    compare with :func:`file_records`."""
    renamed = {}
    for record in records:
        assert record["image"].startswith(prefix)
        name = record["image"][len(prefix):]
        renamed[name] = {**record, "image": name}
    return renamed


def _as_files(records: dict[str, dict]) -> dict[str, dict]:
    return {name: {**record, "image": name} for name, record in records.items()}


# --- in-process: fsspec's memory filesystem ---------------------------------------------------------------------------


@pytest.fixture()
def memory_bucket(shoot: Path) -> Iterator[str]:
    fs = fsspec.filesystem("memory")
    for name, path in _files(shoot).items():
        fs.pipe(f"/bucket/shoot/{name}", path.read_bytes())
    yield "memory:///bucket/shoot/"  # the memory filesystem's own spelling
    fs.rm("/bucket", recursive=True)


def test_urls_are_discovered_like_folders_and_globs(memory_bucket: str) -> None:
    url = memory_bucket
    assert is_url(url) and not is_url("photos/a.jpg") and not is_url("C:/photos/a.jpg")
    assert discover_images([url]) == [f"memory:///bucket/shoot/{n}" for n in ["a.jpg", "b.PNG", "broken.jpg",
                                                                            "c.jpeg", "d.jpg"]]
    assert discover_images([url], recursive=True)[-1] == "memory:///bucket/shoot/sub/e.jpg"
    # A glob gives every key it matches; an explicit key is kept even when missing (it becomes an error record).
    assert discover_images([url + "*.txt", url + "nope.jpg"]) == [url + "nope.jpg", url + "notes.txt"]
    assert image_key(url + "a.jpg") == url + "a.jpg"  # a URL is its own key (no realpath)
    assert path_exists(url + "a.jpg") and not path_exists(url + "nope.jpg")


def test_local_engine_captions_urls_like_files(
    memory_bucket: str, model_dir: Path, file_records: dict[str, dict], tmp_path: Path
) -> None:
    out = tmp_path / "memory.jsonl"
    status = main(["caption", memory_bucket, memory_bucket + "missing.jpg", "-r", "--model", str(model_dir),
                   "--runtime", "torch", "--workers", "0", "--out", str(out), "-q"])
    assert status == 1
    records = _renamed(_records(out), memory_bucket)
    missing = records.pop("missing.jpg")
    assert missing == {"image": "missing.jpg", "error": f"no such image file: {memory_bucket}missing.jpg"}
    assert_same_records(records, _as_files(file_records))
    # --resume matches URL records to URL inputs.
    assert main(["caption", memory_bucket, "-r", "--model", str(model_dir), "--runtime", "torch", "--workers", "0",
                 "--out", str(out), "--resume", "-q"]) == 1
    assert len(_records(out)) == len(records) + 1


def test_the_local_engine_imports_no_ray_pyarrow_or_boto() -> None:
    """Also a guard for the suite: these native libraries must stay out of the pytest process (subprocesses only)."""
    import captioner.batch
    import captioner.caption_command
    import captioner.cli  # noqa: F401

    assert not {"ray", "s3fs", "botocore", "aiobotocore", "pyarrow"} & set(sys.modules)


# --- a real S3-compatible server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(shoot: Path) -> Iterator[MotoServer]:
    if not HAVE_S3:
        pytest.skip("s3fs and moto[server] are not installed (pip install 'captioner[ray,dev]')")
    server = MotoServer()
    try:
        server.wait_ready()
        server.upload("photos", {f"shoot/{name}": path for name, path in _files(shoot).items()})
        yield server
    finally:
        server.stop()


def test_local_engine_reads_s3(s3: MotoServer, model_dir: Path, file_records: dict[str, dict], tmp_path: Path
                               ) -> None:
    out = tmp_path / "s3.jsonl"
    env = {**os.environ, **s3.env}
    del env["AWS_ENDPOINT_URL"]  # given as --endpoint-url instead; the credentials come from the environment
    status, stderr = run_captioner(
        ["caption", "s3://photos/shoot/", "s3://photos/shoot/missing.jpg", "-r", "--model", model_dir,
         "--runtime", "torch", "--workers", "2", "--endpoint-url", s3.endpoint, "--out", out], env, cwd=tmp_path,
    )
    assert status == 1, stderr
    assert "failed: s3://photos/shoot/broken.jpg" in stderr
    records = _renamed(_records(out), "s3://photos/shoot/")
    assert records.pop("missing.jpg")["error"] == "no such image file: s3://photos/shoot/missing.jpg"
    assert_same_records(records, _as_files(file_records))
