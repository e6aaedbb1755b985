"""The torchrun environment, read in one place by batch captioning and training."""

from __future__ import annotations

import pytest

from captioner.distributed import Launch, average_gradients, barrier, broadcast_from_main


def test_launch_from_env() -> None:
    assert Launch.from_env({}) == Launch(0, 1, 0) and Launch.from_env({}).main
    launch = Launch.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert launch == Launch(3, 4, 1) and not launch.main
    assert Launch.from_env({"WORLD_SIZE": ""}) == Launch()  # set but empty counts as unset
    with pytest.raises(ValueError, match="RANK must be an integer, got 'x'"):
        Launch.from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_helpers_are_no_ops_for_one_process() -> None:
    import torch

    single = Launch()
    parameter = torch.nn.Parameter(torch.ones(2))
    parameter.grad = torch.full((2,), 3.0)
    barrier(single)
    average_gradients([parameter], single)
    assert parameter.grad.tolist() == [3.0, 3.0] and broadcast_from_main("stop", single) == "stop"


def test_caption_command_rejects_a_bad_torchrun_environment(
    tiny_model_dir: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from captioner.cli import main

    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["caption", "x.jpg", "--model", str(tiny_model_dir)]) == 2
    assert "bad RANK/WORLD_SIZE: WORLD_SIZE must be an integer, got 'two'" in capsys.readouterr().err
