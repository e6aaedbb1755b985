"""Ensembles of decoders over one encoder (captioner/ensemble.py): the search, the model directory, every door.

The reference below is deliberately naive (one image at a time, Python lists, the plain ``CaptionDecoder.step``
rather than the fast path): the members' log-probabilities are averaged by hand, renormalised, and searched
greedily or with a beam, and ``decode`` must find the same captions.
"""

from __future__ import annotations

import importlib.util
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CAPTIONS, varied_tiny_model
from flask import Flask
from PIL import Image
from safetensors.torch import load_file

from captioner import decoding
from captioner.api import Captioner
from captioner.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CaptionModel,
    ensemble_of,
    load_model,
    read_config,
    save_model,
)
from captioner.cli import main
from captioner.decoding import DecodingOptions, decode
from captioner.encoder import sha256_file
from captioner.ensemble import DecoderEnsemble
from captioner.errors import CheckpointError
from captioner.model import CaptionDecoder, DecoderConfig
from captioner.preprocess import PreprocessConfig
from captioner.vocabulary import Vocabulary
from service.app import create_app
from service.routes.common import ENGINE_KEY
from training.evaluation import load_results

VOCAB = Vocabulary.build(TINY_CAPTIONS, min_count=1)
SHUFFLED_VOCAB = Vocabulary([*VOCAB.words[:4], *reversed(VOCAB.words[4:])])  # the same size, other ids
CHANNELS = 1280  # MobileNetV2's, the tiny models' encoder
ARCHITECTURES = [
    {"cell": "lstm", "conditioning": "attention", "num_layers": 1},
    {"cell": "gru", "conditioning": "init", "num_layers": 2},
    {"cell": "rnn", "conditioning": "attention", "num_layers": 2},
]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def tiny_decoder(seed: int, cell: str = "lstm", conditioning: str = "attention", num_layers: int = 1) -> CaptionDecoder:
    """A random decoder whose classifier is scaled up, so that its distributions are peaked (no near-ties)."""
    torch.manual_seed(seed)
    decoder = CaptionDecoder(DecoderConfig(len(VOCAB), CHANNELS, embed_dim=16, hidden_dim=32, attention_dim=16,
                                           num_layers=num_layers, cell=cell, conditioning=conditioning, dropout=0.0))
    with torch.no_grad():
        decoder.classifier.weight.mul_(12)
        decoder.init_h.weight.mul_(20)  # so that the image matters
    return decoder.eval()


def grids(images: int = 3) -> torch.Tensor:
    return torch.randn(images, CHANNELS, 2, 2, generator=torch.Generator().manual_seed(1))


# -- the search ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: f"{a['cell']}-{a['conditioning']}")
def test_one_member_ensemble_gives_the_single_decoders_captions_and_scores(architecture: dict) -> None:
    decoder = tiny_decoder(0, **architecture)
    for options in (
        DecodingOptions(strategy="greedy", max_length=8),
        DecodingOptions(beam_size=4, num_captions=3, max_length=8, length_penalty=1.0, no_repeat_ngram_size=2),
    ):
        single = decode(decoder, grids(), VOCAB, options)
        assert decode(DecoderEnsemble([decoder]), grids(), VOCAB, options) == single  # floats too: exactly


def _reference_next(members: list[CaptionDecoder], memories: list, states: list, token: int, step: int,
                    max_length: int) -> tuple[list[float], list]:
    """The hand-made ensemble step: mean of the members' log-softmaxes, renormalised, then the decoding rules."""
    tokens = torch.tensor([token])
    log_probs, new_states = [], []
    for member, memory, state in zip(members, memories, states, strict=True):
        logits, state, _ = member.step(tokens, state, memory)
        log_probs.append(torch.log_softmax(logits[0].double(), dim=0))
        new_states.append(state)
    logp = torch.log_softmax(sum(log_probs) / len(log_probs), dim=0).tolist()
    inf = float("inf")
    for banned in (VOCAB.pad, VOCAB.start, VOCAB.unk):
        logp[banned] = -inf
    if step == 0:
        logp[VOCAB.end] = -inf
    if step == max_length:
        logp = [v if w == VOCAB.end else -inf for w, v in enumerate(logp)]
    return logp, new_states


def _reference_beam(members: list[CaptionDecoder], grid: torch.Tensor | list[torch.Tensor], width: int,
                    max_length: int, penalty: float) -> list[tuple[list[int], float]]:
    """Beam search over one image: (words without <end>, summed log-probability) of the beams, best first.
    ``grid`` is the image's grid, or a list of its grids, one per member (members over different encoders)."""
    member_grids = grid if isinstance(grid, list) else [grid] * len(members)
    memories, states = zip(*(member.memory_and_state(g.unsqueeze(0)) for member, g in zip(
        members, member_grids, strict=True)), strict=True)
    beams = [([], 0.0, list(states), False)]  # (words, log_prob, each member's state, finished)

    def score(beam: tuple) -> float:
        return beam[1] / len(beam[0]) ** penalty

    for step in range(max_length + 1):
        candidates = []
        for words, log_prob, beam_states, finished in beams:
            if finished:
                candidates.append((words, log_prob, beam_states, True))
                continue
            token = words[-1] if words else VOCAB.start
            logp, new_states = _reference_next(members, memories, beam_states, token, step, max_length)
            candidates += [(words + [w], log_prob + lp, new_states, w == VOCAB.end)
                           for w, lp in enumerate(logp) if lp > -float("inf")]
        beams = sorted(candidates, key=score, reverse=True)[:width]
        if all(beam[3] for beam in beams):
            break
    return [([w for w in words if w != VOCAB.end], log_prob) for words, log_prob, _, _ in beams]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_two_member_ensemble_matches_a_hand_computed_search(strategy: str) -> None:
    members = [tiny_decoder(1), tiny_decoder(2, cell="gru", conditioning="init", num_layers=2)]
    options = DecodingOptions(strategy=strategy, beam_size=3, num_captions=3 if strategy == "beam" else 1,
                              max_length=6, length_penalty=1.0)
    found = decode(DecoderEnsemble(members).eval(), grids(), VOCAB, options)  # eval: the fast path, as shipped
    with torch.no_grad():
        expected = [_reference_beam(members, grid, options.width, options.max_length, options.length_penalty)
                    for grid in grids()]
    for hyps, reference in zip(found, expected, strict=True):
        assert [h.tokens for h in hyps] == [words for words, _ in reference]
        assert [h.log_prob for h in hyps] == pytest.approx([lp for _, lp in reference], abs=1e-4)
    # The ensemble is neither member: its captions differ from each member's own.
    for member in members:
        assert [h[0].tokens for h in decode(member, grids(), VOCAB, options)] != [h[0].tokens for h in found]


def test_members_over_different_encoders_read_one_grid_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Members may read different encoders' grids of the same images (scripts/multi_encoder_ensemble.py): given
    one grid per member, the search is the hand-computed one over those grids; one grid is every member's; decode()
    groups and splits such batches as it does one grid."""
    members = [tiny_decoder(1), tiny_decoder(2)]
    steps = DecoderEnsemble(members).eval().steps()
    other = torch.randn(3, CHANNELS, 3, 3, generator=torch.Generator().manual_seed(2))  # another encoder's 3x3 grid
    options = DecodingOptions(beam_size=3, num_captions=3, max_length=6, length_penalty=1.0)
    found = decoding._decode_group(steps, [grids(), other], VOCAB, options)
    with torch.no_grad():
        expected = [_reference_beam(members, [a, b], options.width, options.max_length, options.length_penalty)
                    for a, b in zip(grids(), other, strict=True)]
    for hyps, reference in zip(found, expected, strict=True):
        assert [h.tokens for h in hyps] == [words for words, _ in reference]
        assert [h.log_prob for h in hyps] == pytest.approx([lp for _, lp in reference], abs=1e-4)
    assert found != decoding._decode_group(steps, grids(), VOCAB, options)  # the second grid mattered
    ensemble = DecoderEnsemble(members).eval()
    def same(a: list[list], b: list[list]) -> bool:  # batches of other sizes round a few floats differently
        return [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b] and [
            h.log_prob for x in a for h in x] == pytest.approx([h.log_prob for x in b for h in x], abs=1e-5)

    assert same(decode(ensemble, [grids(), grids()], VOCAB, options), decode(ensemble, grids(), VOCAB, options))
    # decode() takes them too: grouped by options (the rows of every member's grids) and split over threads.
    mixed = [options, DecodingOptions(strategy="greedy", max_length=6), options]
    by_image = decode(ensemble, [grids(), other], VOCAB, mixed)
    assert same([by_image[0], by_image[2]], [found[0], found[2]]) and len(by_image[1]) == 1
    parts: list[list[int]] = []
    decode_group = decoding._decode_group
    monkeypatch.setattr(decoding, "_decode_group", lambda steps, part, *rest: parts.append(
        [g.size(0) for g in part]) or decode_group(steps, part, *rest))  # fmt: skip
    torch.set_num_threads(2)
    try:
        assert same(decode(ensemble, [grids(), other], VOCAB, options), found)
    finally:
        torch.set_num_threads(1)
    assert parts == [[2, 2], [1, 1]]  # two parts, each with its rows of both members' grids
    with pytest.raises(ValueError, match="1 grids for 2 ensemble members"):
        steps.memory_and_state([grids()])
    with pytest.raises(ValueError, match="one grid per member needs an ensemble"):
        decode(members[0], [grids()], VOCAB, options)
    with pytest.raises(ValueError, match=r"different numbers of images: \[3, 2\]"):
        decode(ensemble, [grids(), other[:2]], VOCAB, options)


def test_an_ensemble_in_train_mode_decodes_like_in_eval_mode() -> None:
    """Training's validation decodes its decoder in whatever mode; without dropout the modes agree."""
    ensemble = DecoderEnsemble([tiny_decoder(1), tiny_decoder(3, cell="rnn", num_layers=2)])
    options = DecodingOptions(beam_size=3, num_captions=2, max_length=6)
    evaluated = decode(ensemble.eval(), grids(), VOCAB, options)  # (a new module starts in train mode)
    trained = decode(ensemble.train(), grids(), VOCAB, options)
    for a, b in zip(evaluated, trained, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.log_prob for h in a] == pytest.approx([h.log_prob for h in b], abs=1e-4)


def test_an_ensemble_on_two_threads_is_decoded_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ensemble in eval mode is split over the threads like one decoder (decoding._decode_in_parts), with the
    same hypotheses as one batch."""
    ensemble = DecoderEnsemble([tiny_decoder(1), tiny_decoder(3, cell="rnn", num_layers=2)]).eval()
    options = DecodingOptions(beam_size=3, num_captions=2, max_length=6)
    one_batch = decode(ensemble, grids(), VOCAB, options)
    threads: list[str] = []
    decode_group = decoding._decode_group
    monkeypatch.setattr(decoding, "_decode_group", lambda *args: threads.append(threading.current_thread().name)
                        or decode_group(*args))  # fmt: skip
    torch.set_num_threads(2)
    try:
        in_parts = decode(ensemble, grids(), VOCAB, options)
    finally:
        torch.set_num_threads(1)
    assert len(threads) == 2 and all(name.startswith("decode_") for name in threads)
    for a, b in zip(in_parts, one_batch, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.log_prob for h in a] == pytest.approx([h.log_prob for h in b], abs=1e-5)


def test_members_must_share_vocabulary_and_features() -> None:
    other = CaptionDecoder(DecoderConfig(len(VOCAB) + 1, CHANNELS, embed_dim=8, hidden_dim=8, attention_dim=8))
    with pytest.raises(ValueError, match="decoder 2 has vocab_size"):
        DecoderEnsemble([tiny_decoder(0), other])
    with pytest.raises(ValueError, match="at least one"):
        DecoderEnsemble([])


# -- model directories -----------------------------------------------------------------------------------------------

def _model(
    decoder: CaptionDecoder | DecoderEnsemble, base: CaptionModel | None = None, **changes: object
) -> CaptionModel:
    """A model with ``decoder`` over ``base``'s encoder (by default the calibrated tiny model's)."""
    base = base or varied_tiny_model()
    fields = {"vocab": base.vocab, "preprocess": base.preprocess, "name": "tiny", "version": "test"} | changes
    return CaptionModel(base.encoder, decoder, tagger=base.tagger, **fields)


def test_ensemble_directory_round_trip_and_damage(tmp_path: Path) -> None:
    members = [tiny_decoder(1), tiny_decoder(2, **ARCHITECTURES[1])]
    saved = save_model(_model(DecoderEnsemble(members)), tmp_path / "ensemble")
    config = read_config(saved)
    assert "decoder" not in config and [DecoderConfig(**c) for c in config["decoders"]] == [m.config for m in members]
    tensors = load_file(str(saved / WEIGHTS_FILE))
    assert not any(k.startswith("decoder.") for k in tensors)
    assert {k.split(".")[1] for k in tensors if k.startswith("decoders.")} == {"0", "1"}

    loaded = load_model(saved)
    assert isinstance(loaded.decoder, DecoderEnsemble) and not loaded.decoder.training
    assert loaded.decoder.configs == [m.config for m in members]
    for original, member in zip(members, loaded.decoder.members, strict=True):
        assert all(torch.equal(v, member.state_dict()[k]) for k, v in original.state_dict().items())
    options = DecodingOptions(beam_size=3, num_captions=2, max_length=6)
    assert decode(loaded.decoder, grids(), VOCAB, options) == decode(DecoderEnsemble(members), grids(), VOCAB, options)

    # A tampered weight file is refused by the same sha256 check as a single decoder's.
    tampered = Path(save_model(_model(DecoderEnsemble(members)), tmp_path / "tampered"))
    data = bytearray((tampered / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01  # a bit of the last tensor's data
    (tampered / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(tampered)

    # A member whose config does not fit the vocabulary, or whose tensors are missing, is named.
    config["decoders"][1]["vocab_size"] += 1
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_model(saved)
    config["decoders"] = config["decoders"][:1] * 3  # a third member with no tensors
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensors \['attention"):
        load_model(saved)
    for decoders in ([], "lstm"):
        (saved / CONFIG_FILE).write_text(json.dumps(config | {"decoders": decoders}))
        with pytest.raises(CheckpointError, match="inconsistent.*non-empty list"):
            load_model(saved)


def test_single_decoder_directories_load_unchanged(tiny_model_dir: Path) -> None:
    config = read_config(tiny_model_dir)
    assert "decoders" not in config and "decoder" in config
    assert isinstance(load_model(tiny_model_dir).decoder, CaptionDecoder)


def test_ensemble_of_refuses_models_that_do_not_share_encoder_preprocessing_or_vocabulary() -> None:
    base = varied_tiny_model()
    a = _model(tiny_decoder(1), base)
    with pytest.raises(CheckpointError, match="member 2 has another vocabulary.*first difference at id 4"):
        ensemble_of([a, _model(tiny_decoder(2), base, vocab=SHUFFLED_VOCAB)])
    with pytest.raises(CheckpointError, match="member 2 preprocesses images"):
        ensemble_of([a, _model(tiny_decoder(2), base, preprocess=PreprocessConfig(size=96))])
    retrained = varied_tiny_model()
    with torch.no_grad():
        next(retrained.encoder.parameters()).add_(0.01)
    with pytest.raises(CheckpointError, match="member 2's encoder weights differ"):
        ensemble_of([a, _model(tiny_decoder(2), retrained)])

    # Compatible models: the members' decoders in order (an ensemble brings its own), the first's settings.
    pair = ensemble_of([a, _model(DecoderEnsemble([tiny_decoder(2), tiny_decoder(3)]), base, name="b")])
    assert isinstance(pair.decoder, DecoderEnsemble) and len(pair.decoder.members) == 3
    assert pair.decoder.members[0] is a.decoder and pair.encoder is base.encoder
    assert [m["name"] for m in pair.training["members"]] == ["tiny", "b"] and pair.metrics == {}


def _script(name: str, argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _ship_model(argv: list[str]) -> int:
    return _script("ship_model", argv)


def test_ship_model_builds_an_ensemble_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = varied_tiny_model()
    runs = [save_model(_model(tiny_decoder(seed), base), tmp_path / f"run{seed}" / "best") for seed in (1, 2)]
    out = tmp_path / "shipped"
    assert _ship_model([*map(str, runs), "--out", str(out), "--version", "9", "--set", "beam_size=4"]) == 0
    assert "(2 decoders)" in capsys.readouterr().out
    manifest = dict(line.split("  ")[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
    assert manifest == {name: sha256_file(out / name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    assert {t.dtype for k, t in load_file(str(out / WEIGHTS_FILE)).items() if k.startswith("decoders.")} == {
        torch.float16}
    shipped = load_model(out)
    assert (shipped.version, shipped.decoding["beam_size"]) == ("9", 4)
    assert [m["source"] for m in shipped.training["members"]] == [str(r) for r in runs]
    for seed, member in zip((1, 2), shipped.decoder.members, strict=True):
        weight = tiny_decoder(seed).classifier.weight
        assert torch.allclose(member.classifier.weight, weight, rtol=1e-3, atol=1e-3)

    # A shipped ensemble joins a run trained on its (float16-stored) encoder: its decoders come along, and the
    # message counts decoders, not models.
    third = save_model(_model(tiny_decoder(3), shipped), tmp_path / "run3" / "best")
    assert _ship_model([str(out), str(third), "--out", str(tmp_path / "triple")]) == 0
    assert "(3 decoders)" in capsys.readouterr().out
    assert len(load_model(tmp_path / "triple").decoder.members) == 3
    # one record per decoder, each naming the run it was trained in
    assert [m["source"] for m in load_model(tmp_path / "triple").training["members"]] == [*map(str, runs), str(third)]

    # split_ensemble.py gives the members back as models of their own, each with its record; they ship again as one.
    assert _script("split_ensemble", [str(tmp_path / "triple"), str(tmp_path / "parts")]) == 0
    parts = [load_model(tmp_path / "parts" / f"member{n}") for n in (1, 2, 3)]
    shipped_members = [m["training"] for m in shipped.training["members"]]  # the ensemble's two, then run3's
    assert [p.training for p in parts] == [*shipped_members, load_model(third).training]
    for part, member in zip(parts, load_model(tmp_path / "triple").decoder.members, strict=True):
        assert isinstance(part.decoder, CaptionDecoder) and torch.equal(part.decoder.classifier.weight,
                                                                        member.classifier.weight)
    assert _ship_model([str(tmp_path / "parts" / "member1"), str(third), "--out", str(tmp_path / "pair")]) == 0
    assert "(2 decoders)" in capsys.readouterr().out
    assert _script("split_ensemble", [str(third), str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not an ensemble" in error and not (tmp_path / "none").exists()

    other = save_model(_model(tiny_decoder(3), base, vocab=SHUFFLED_VOCAB), tmp_path / "other" / "best")
    assert _ship_model([str(runs[0]), str(other), "--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "member 2 has another vocabulary" in error
    assert not (tmp_path / "refused").exists()


# -- every door ------------------------------------------------------------------------------------------------------

RECORDED = {"beam_size": 4, "length_penalty": 1.0, "no_repeat_ngram_size": 3, "max_length": 10}


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-member ensemble over the calibrated tiny encoder, recording non-default decoding options."""
    base = varied_tiny_model()
    model = _model(DecoderEnsemble([base.decoder, tiny_decoder(2, **ARCHITECTURES[2])]), base)
    model.decoding = dict(RECORDED)
    return save_model(model, tmp_path_factory.mktemp("models") / "ensemble")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for seed in range(4):
        pixels = np.random.default_rng(seed).integers(0, 256, (60 + 10 * seed, 80, 3), dtype=np.uint8)
        paths.append(root / f"photo{seed}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_every_door_decodes_the_ensemble(ensemble_dir: Path, photos: list[Path], tmp_path: Path) -> None:
    """The API, ``captioner caption``, ``POST /v1/captions`` and ``captioner evaluate`` give the same captions.

    The encoder runs in PyTorch everywhere (the runtimes are tested elsewhere; the decoder is PyTorch in all of
    them), and the commands run in-process through ``captioner.cli.main`` (the console script is tested elsewhere).
    """
    captioner = Captioner.load(ensemble_dir, allow_download=False, runtime="torch")
    assert isinstance(captioner.model.decoder, DecoderEnsemble)
    api = captioner.caption(photos)
    texts = [c[0].text for c in api]
    assert len(set(texts)) > 1
    # The API decodes the ensemble, not its first member.
    alone = Captioner(load_model(ensemble_dir), runtime="torch")
    alone.model.decoder = alone.model.decoder.members[0]
    assert [c[0].text for c in alone.caption(photos)] != texts

    out = tmp_path / "out.jsonl"
    assert main(["caption", *map(str, photos), "--model", str(ensemble_dir), "--out", str(out), "--workers", "0",
                 "--quiet", "--runtime", "torch"]) == 0
    records = {r["image"]: r["caption"] for r in map(json.loads, out.read_text().splitlines())}
    assert [records[str(p)] for p in photos] == texts

    app: Flask = create_app({"model": str(ensemble_dir), "load_in_background": False, "runtime": "torch"})
    try:
        client = app.test_client()
        for path, captions in zip(photos, api, strict=True):
            response = client.post("/v1/captions", data={"image": (io.BytesIO(path.read_bytes()), path.name)})
            assert response.status_code == 200, response.json
            assert response.json["captions"][0]["text"] == captions[0].text
            assert response.json["captions"][0]["score"] == pytest.approx(captions[0].score, abs=1e-5)
    finally:
        app.extensions[ENGINE_KEY].close()

    _evaluate(ensemble_dir, photos, tmp_path)
    assert load_results(tmp_path / "eval" / "results.json") == dict(enumerate(texts))


def _evaluate(model_dir: Path, photos: list[Path], tmp_path: Path) -> Path:
    """``captioner evaluate`` of ``model_dir`` on ``photos`` (one reference caption each) into tmp_path/eval."""
    annotations = tmp_path / "captions.json"  # a COCO file over the photos
    annotations.write_text(json.dumps({
        "images": [{"id": i, "file_name": p.name} for i, p in enumerate(photos)],
        "annotations": [{"id": i, "image_id": i, "caption": "a dog runs on the grass"} for i in range(len(photos))],
    }))
    assert main(["evaluate", "--model", str(model_dir), "--annotations", str(annotations), "--images",
                 str(photos[0].parent), "--out-dir", str(tmp_path / "eval"), "--metrics", "bleu",
                 "--python-tokenizer", "--workers", "0", "--device", "cpu", "--runtime", "torch"]) == 0
    return tmp_path / "eval" / "metrics.json"


def test_ship_model_records_the_ensembles_own_evaluation(
    photos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--metrics test=FILE``: a ``captioner evaluate`` of the shipped decoding becomes ``metrics.final.test``."""
    base = varied_tiny_model()
    runs = [str(save_model(_model(tiny_decoder(seed), base), tmp_path / f"run{seed}")) for seed in (1, 2)]
    first, second = tmp_path / "first", tmp_path / "second"
    assert _ship_model([*runs, "--out", str(first), "--set", "beam_size=2"]) == 0
    assert load_model(first).metrics == {}
    evaluation = _evaluate(first, photos, tmp_path)
    capsys.readouterr()

    argv = [*runs, "--out", str(second), "--set", "beam_size=2", "--metrics", f"test={evaluation}"]
    assert _ship_model(argv) == 0
    assert load_model(second).metrics == {"final": {"test": json.loads(evaluation.read_text())["metrics"]}}
    assert sha256_file(second / WEIGHTS_FILE) == sha256_file(first / WEIGHTS_FILE)  # the models it scored
    # Scores of another decoding, or no file, are refused with one line and nothing written.
    for bad, message in (([*runs, "--set", "beam_size=3", "--metrics", f"test={evaluation}"], "not the shipped"),
                         ([*runs, "--metrics", "test"], "SPLIT=FILE"),
                         ([*runs, "--metrics", f"test={tmp_path / 'captions.json'}"], "not a metrics.json")):
        assert _ship_model([*bad, "--out", str(tmp_path / "refused")]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error
        assert not (tmp_path / "refused").exists()
