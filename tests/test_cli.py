"""The ``captioner`` console script as a user meets it: one-line errors with exit status 2, help, --version.

Every case runs the real console script in a subprocess, so what is pinned here is exactly what a user sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioner import caption_command
from captioner.cli import build_parser, check_model_dir, main

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["caption", "train", "evaluate", "serve", "prepare", "prepare flickr8k", "prepare karpathy",
               "prepare coco"]


def captioner(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "CAPTIONER_DEBUG")}
    return subprocess.run([VENV_BIN / "captioner", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=base | {"OMP_NUM_THREADS": "1"} | (env or {}), cwd=cwd)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A training run's folder: the model is in best/, not in the folder itself."""
    run = tmp_path_factory.mktemp("runs") / "x"
    (run / "best").mkdir(parents=True)
    for file in tiny_model_dir.iterdir():
        (run / "best" / file.name).write_bytes(file.read_bytes())
    return run


def _one_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    """The one line a mistake prints: no traceback, exit status 2."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    return lines[0]


def test_typo_in_set_names_the_key_meant(tmp_path: Path) -> None:
    line = _one_error_line(captioner("train", "--set", "train.epoch=1", "--out", tmp_path / "run"), "captioner train")
    assert "unknown key train.epoch" in line and "did you mean train.epochs?" in line


def test_train_without_config_says_what_to_pass(tmp_path: Path) -> None:
    line = _one_error_line(captioner("train", "--out", tmp_path / "run", cwd=tmp_path), "captioner train")
    assert "data.train_annotations is not set" in line and "--config FILE" in line
    assert "IsADirectoryError" not in line
    line = _one_error_line(captioner("train", "--config", tmp_path / "nope.toml", "--out", tmp_path / "run"),
                           "captioner train")
    assert "nope.toml: no such file" in line
    config = tmp_path / "c.toml"
    config.write_text('[data]\ntrain_annotations = "missing_train.json"\nval_annotations = "v.json"\n')
    line = _one_error_line(captioner("train", "--config", config, "--out", tmp_path / "run", cwd=tmp_path),
                           "captioner train")
    assert "'missing_train.json': no such file" in line and "captioner prepare" in line


@pytest.mark.parametrize("command", ["serve", "caption", "evaluate"])
def test_run_folder_as_model_suggests_best(command: str, run_folder: Path, tmp_path: Path) -> None:
    extra = {"serve": [], "caption": ["x.jpg"], "evaluate": ["--annotations", "a.json"]}[command]
    line = _one_error_line(captioner(command, "--model", run_folder, *extra, cwd=tmp_path), f"captioner {command}")
    assert f"use --model {run_folder / 'best'}" in line and "training run folder" in line


def test_missing_inputs_fail_before_the_model_loads(tmp_path: Path) -> None:
    # A model path that would fail to load proves the input check comes first: the error is about the inputs.
    broken_model = tmp_path / "model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text("{}")
    started = time.perf_counter()
    line = _one_error_line(captioner("caption", tmp_path / "nope.jpg", tmp_path / "nope2.jpg", "--model",
                                     broken_model), "captioner caption")
    assert f"no such file: {tmp_path / 'nope.jpg'}, {tmp_path / 'nope2.jpg'}" in line
    assert time.perf_counter() - started < 300
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error_line(captioner("caption", empty, "--model", broken_model), "captioner caption")
    assert "name no image files" in line and "-r" in line


def _in_process(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """``captioner ARGS`` through ``main``, the console script's entry point, in this process: its exit status (from
    ``main``'s return or argparse's exit for --help and usage errors), stdout and stderr. The tests around it run the
    real script; this saves one interpreter start (several seconds of imports) per call."""
    try:
        status = main(list(args))
    except SystemExit as exited:
        status = int(exited.code or 0)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), status, out, err)


@pytest.mark.parametrize(("args", "prefix", "expected"), [
    (["serve", "--model", "/nonexistent/model"], "captioner serve", "no such directory"),
    (["evaluate", "--annotations", "nope.json"], "captioner evaluate", "nope.json: no such file"),
    (["prepare", "flickr8k", "--root", "nope", "--out", "o"], "captioner prepare flickr8k", "--root nope: no such"),
    (["prepare", "coco", "--annotations", "nope.json", "--images", ".", "--out", "o"], "captioner prepare coco",
     "nope.json: No such file or directory"),
    (["prepare", "karpathy", "--json", "nope.json", "--images", ".", "--out", "o"], "captioner prepare karpathy",
     "nope.json: No such file or directory"),
    (["caption", "x.jpg", "--device", "tpu"], "captioner caption", "--device must be cpu, cuda or cuda:N (or auto)"),
    (["caption", "--from-list", "nope.txt"], "captioner caption", "nope.txt"),
    (["train", "--set", "train.epochs=abc", "--out", "o"], "captioner train", "train.epochs must be int"),
    (["train", "--set", "nonsense", "--out", "o"], "captioner train", "must look like section.key=value"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_more_mistakes_are_one_line(args: list[str], prefix: str, expected: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "CAPTIONER_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    assert expected in _one_error_line(_in_process(capsys, *args), prefix)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    for proc in (captioner("--debug", "serve", "--model", "/nonexistent/model"),
                 captioner("serve", "--model", "/nonexistent/model", "--debug"),
                 captioner("serve", "--model", "/nonexistent/model", env={"CAPTIONER_DEBUG": "1"})):
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "no such directory" in proc.stderr


def test_argparse_mistakes_exit_2_without_traceback() -> None:
    proc = captioner("serve", "--port", "99999")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --port: must be 1 to 65535" in proc.stderr


def test_version_and_every_help_has_a_description_defaults_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    version = captioner("--version")  # the installed console script
    assert version.returncode == 0 and version.stdout.strip().startswith("captioner ")
    assert version.stdout.split()[1][0].isdigit()
    for command in SUBCOMMANDS:
        proc = _in_process(capsys, *command.split(), "--help")
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        assert "example" in text, command
        assert f"captioner {command}" in text.split("example")[1], command  # the examples use the command
        description = text.split("\n\n")[1]
        assert not description.lstrip().startswith(("positional", "options")), (command, description)
    caption_help = _in_process(capsys, "caption", "--help").stdout
    assert "--batch-size N" in caption_help and "(default: 32)" in caption_help
    assert "--device DEVICE" in caption_help and "(default: auto)" in caption_help


def test_devices_and_placeholders_are_the_same_everywhere() -> None:
    parser = build_parser()
    sub = {name: parser._subparsers._group_actions[0].choices[name] for name in ("caption", "evaluate", "serve")}
    for name, command in sub.items():
        actions = {a.dest: a for a in command._actions}
        assert actions["device"].metavar == "DEVICE", name
        assert actions["model"].metavar == "DIR", name
        assert "auto" in actions["device"].help, name
    assert sub["caption"].parse_args(["x.jpg"]).device == "auto"
    assert sub["evaluate"].parse_args(["--annotations", "a.json"]).device == "auto"


def test_metrics_do_not_offer_spice_and_evaluate_defaults_to_the_bundled_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    proc = _in_process(capsys, "evaluate", "--annotations", "a.json", "--metrics", "spice")
    assert proc.returncode == 2 and "invalid choice: 'spice'" in proc.stderr
    assert "spice" not in _in_process(capsys, "evaluate", "--help").stdout
    args = build_parser().parse_args(["evaluate", "--annotations", "a.json"])
    assert args.model is None and args.results is None  # None: Captioner.load's bundled model


def test_check_model_dir_accepts_model_directories(tiny_model_dir: Path, run_folder: Path) -> None:
    check_model_dir(None)
    check_model_dir(str(tiny_model_dir))
    with pytest.raises(ValueError, match="use --model .*best"):
        check_model_dir(str(run_folder))


def test_ticker_redraws_the_bar_every_interval() -> None:
    class Bar:
        refreshed = 0

        def refresh(self) -> None:
            self.refreshed += 1

    bar = Bar()
    ticker = caption_command.Ticker(bar, interval=0.02)  # type: ignore[arg-type]
    time.sleep(0.5)
    ticker.stop()
    assert bar.refreshed >= 5 and ticker.ticks == bar.refreshed
    ticks = ticker.ticks
    time.sleep(0.1)
    assert ticker.ticks == ticks  # stopped means stopped


@pytest.fixture(scope="module")
def two_good_one_bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (40, 30), (200, 40, 40)).save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"not an image")
    Image.new("RGB", (40, 30), (40, 200, 40)).save(folder / "c.jpg")
    return folder


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "coco"])
def test_failed_inputs_are_named_on_stderr_in_every_format_and_kept_in_input_order(
    fmt: str, two_good_one_bad: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import csv
    import json

    out = tmp_path / f"out.{ {'jsonl': 'jsonl', 'csv': 'csv', 'coco': 'json'}[fmt] }"
    proc = captioner("caption", two_good_one_bad / "c.jpg", two_good_one_bad / "b.jpg", two_good_one_bad / "a.jpg",
                     "--model", tiny_model_dir, "--out", out, "--workers", "0", "--progress")
    assert proc.returncode == 1, proc.stderr
    bad = two_good_one_bad / "b.jpg"
    assert f"failed: {bad}: not_an_image: not an image" in proc.stderr  # the error code, as HTTP gives it
    assert "3/3" in proc.stderr  # --progress: the bar is drawn although stderr is a pipe
    expected = [str(two_good_one_bad / name) for name in ("a.jpg", "b.jpg", "c.jpg")]  # sorted, errors in place
    if fmt == "jsonl":
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["image"] for r in records] == expected and "error" in records[1]
    elif fmt == "csv":
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["image"] for r in rows] == expected and rows[1]["error"] and not rows[0]["error"]
    else:
        assert len(json.loads(out.read_text())) == 2  # a results file has no room for errors: stderr names them


def test_no_progress_bar_when_stderr_is_not_a_terminal(two_good_one_bad: Path, tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    proc = captioner("caption", two_good_one_bad / "a.jpg", "--model", tiny_model_dir, "--out", tmp_path / "o.jsonl",
                     "--workers", "0")
    assert proc.returncode == 0 and "1/1" not in proc.stderr and "captioned 1 images" in proc.stderr


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="the PTB tokenizer needs Java")
def test_evaluate_keeps_the_tokenizer_quiet_unless_on_a_terminal_or_asked(tmp_path: Path) -> None:
    import json

    annotations = tmp_path / "captions_tiny.json"
    annotations.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "a dog runs on the grass"},
                        {"id": 2, "image_id": 2, "caption": "a man rides a bike"}]}))
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "caption": "a dog runs"}, {"image_id": 2, "caption": "a man"}]))
    args = ["evaluate", "--results", results, "--annotations", annotations, "--metrics", "bleu", "--out-dir",
            tmp_path / "eval"]
    quiet = captioner(*args)
    assert quiet.returncode == 0, quiet.stderr
    assert "BLEU-1" in quiet.stdout and "PTBTokenizer" not in quiet.stderr
    loud = captioner(*args, "--progress")
    assert loud.returncode == 0 and "PTBTokenizer tokenized" in loud.stderr
