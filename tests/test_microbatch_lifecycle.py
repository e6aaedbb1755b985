"""The micro-batcher's own rules with a stand-in model (no torch model): who waits, for how long, what goes together.

The stand-in records every batch it is given and answers each row with a marker naming the row's image, so every
test sees exactly which images were batched together, in which order, and that each request got its own answer.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from captioner.decoding import DecodingOptions
from captioner.tags import DEFAULT_NUM_TAGS
from service.microbatch import MicroBatcher

GREEDY, BEAM = DecodingOptions(strategy="greedy"), DecodingOptions(beam_size=2)


class StandIn:
    """``caption_tensors`` that logs its batches and answers ``("caption of", image number, options)`` per row."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.num_tags: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = False

    def caption_tensors(self, batch: torch.Tensor, options: list[DecodingOptions], num_tags: int) -> list:
        self.entered.set()
        self.gate.wait(10)
        numbers = [int(row[0, 0, 0]) for row in batch]
        self.batches.append(numbers)
        self.num_tags.append(num_tags)
        if self.fail:
            raise RuntimeError("model failed")
        return [("caption of", n, o) for n, o in zip(numbers, options, strict=True)]


def image(number: int) -> torch.Tensor:
    return torch.full((3, 2, 2), float(number))


def test_defaults() -> None:
    batcher = MicroBatcher(StandIn())
    try:
        assert (batcher.max_size, batcher.max_wait, batcher.observer) == (16, 0.010, None)
    finally:
        batcher.close()


def test_close_gives_up_waiting_after_its_timeout() -> None:
    model = StandIn()
    model.gate.clear()  # a batch that does not finish
    batcher = MicroBatcher(model, max_size=2, max_wait_ms=0)
    future = batcher.submit(image(1), GREEDY)
    assert model.entered.wait(10)
    started = time.perf_counter()
    batcher.close(timeout=0.2)
    assert time.perf_counter() - started < 5  # returned, though the thread is still busy
    assert batcher._thread.is_alive()
    model.gate.set()
    assert future.result(10).captions[1] == 1
    batcher._thread.join(10)


def test_a_full_batch_does_not_wait_for_announced_images() -> None:
    model = StandIn()
    batcher = MicroBatcher(model, max_size=2, max_wait_ms=5000)
    try:
        with batcher.expecting(3) as ticket:
            futures = [batcher.submit(image(i), GREEDY, ticket) for i in (1, 2)]
            assert [f.result(2.5).batch_size for f in futures] == [2, 2]  # full: no waiting for the third
            with batcher.expecting(1) as single:
                batcher.submit(image(3), GREEDY, single)
                assert single.remaining == 0 and batcher._expected == 1  # the first request's third, still due
        with batcher.expecting(3) as ticket:
            ticket.release()
            assert ticket.remaining == 2
    finally:
        batcher.close()


def test_one_image_batches_are_allowed() -> None:
    model = StandIn()
    batcher = MicroBatcher(model, max_size=1, max_wait_ms=0)
    try:
        assert [batcher.submit(image(i), GREEDY).result(10).batch_size for i in (1, 2)] == [1, 1]
    finally:
        batcher.close()


def test_settings_are_checked() -> None:
    for size, wait in ((0, 10.0), (4, -1.0)):
        with pytest.raises(ValueError, match="^max_size must be >= 1 and max_wait_ms >= 0$"):
            MicroBatcher(StandIn(), max_size=size, max_wait_ms=wait)


def test_each_request_gets_its_own_answer_and_the_batch_facts() -> None:
    model = StandIn()
    observed: list[tuple[int, float]] = []
    batcher = MicroBatcher(model, max_size=8, max_wait_ms=5000, observer=lambda n, s: observed.append((n, s)))
    try:
        options = [GREEDY, BEAM, GREEDY, BEAM, GREEDY]
        with batcher.expecting(5) as ticket:
            futures = [batcher.submit(image(i), o, ticket) for i, o in enumerate(options)]
        results = [f.result(10) for f in futures]
    finally:
        batcher.close()
    assert model.batches == [[0, 1, 2, 3, 4]] and model.num_tags == [DEFAULT_NUM_TAGS]
    assert [r.captions for r in results] == [("caption of", i, o) for i, o in enumerate(options)]
    assert all(r.batch_size == 5 for r in results)
    assert len(observed) == 1 and observed[0][0] == 5
    assert all(r.inference_ms == pytest.approx(observed[0][1] * 1000) for r in results)
    assert all(0 <= r.queue_ms < 5000 for r in results)
    assert 0 <= observed[0][1] < 5  # seconds: the stand-in answers at once


def test_a_lone_request_does_not_wait() -> None:
    model = StandIn()
    batcher = MicroBatcher(model, max_size=8, max_wait_ms=5000)
    try:
        assert batcher._thread.name == "micro-batcher" and batcher._thread.daemon  # never blocks interpreter exit
        started = time.perf_counter()
        result = batcher.submit(image(7), GREEDY).result(10)
        assert time.perf_counter() - started < 2.5  # nothing announced: no waiting for company
        assert result.captions == ("caption of", 7, GREEDY) and result.batch_size == 1
    finally:
        batcher.close()


def test_an_announced_image_is_waited_for_at_most_max_wait() -> None:
    model = StandIn()
    batcher = MicroBatcher(model, max_size=8, max_wait_ms=300)
    try:
        with batcher.expecting(2) as ticket:
            result = batcher.submit(image(1), GREEDY, ticket).result(10)  # the second never comes
            assert result.batch_size == 1
            assert 250 <= result.queue_ms < 3000  # waited for the announced one, then gave up
    finally:
        batcher.close()


def test_a_withdrawn_image_is_not_waited_for() -> None:
    model = StandIn()
    batcher = MicroBatcher(model, max_size=8, max_wait_ms=5000)
    try:
        with batcher.expecting(2) as ticket:
            future = batcher.submit(image(1), GREEDY, ticket)
            ticket.release()  # the second image failed to decode
            assert ticket.remaining == 0
            assert future.result(2.5).queue_ms < 2500
        with batcher.expecting(3) as ticket:
            ticket.release(10)  # more than announced: only what is left is withdrawn
            assert ticket.remaining == 0
        assert batcher._expected == 0
    finally:
        batcher.close()


def test_leaving_the_announcement_withdraws_the_rest() -> None:
    batcher = MicroBatcher(StandIn(), max_size=8, max_wait_ms=5000)
    try:
        with batcher.expecting(3) as ticket:
            assert batcher._expected == 3
            batcher.submit(image(1), GREEDY, ticket)
            assert (ticket.remaining, batcher._expected) == (2, 2)
        assert batcher._expected == 0
        batcher.submit(image(2), GREEDY, ticket)  # a ticket with nothing left: submitting does not go negative
        assert batcher._expected == 0
    finally:
        batcher.close()


def test_queued_images_are_taken_together_up_to_max_size() -> None:
    model = StandIn()
    model.gate.clear()  # the first batch holds the model while the others queue up
    batcher = MicroBatcher(model, max_size=3, max_wait_ms=0)
    try:
        first = batcher.submit(image(0), GREEDY)
        assert model.entered.wait(10)
        rest = [batcher.submit(image(i), BEAM if i % 2 else GREEDY) for i in range(1, 8)]
        model.gate.set()
        assert [f.result(10).captions[1] for f in [first, *rest]] == list(range(8))
    finally:
        batcher.close()
    assert model.batches == [[0], [1, 2, 3], [4, 5, 6], [7]]


def test_cancelled_requests_are_dropped_before_the_model() -> None:
    model = StandIn()
    model.gate.clear()
    batcher = MicroBatcher(model, max_size=8, max_wait_ms=0)
    try:
        batcher.submit(image(0), GREEDY)
        assert model.entered.wait(10)
        futures = [batcher.submit(image(i), GREEDY) for i in (1, 2, 3)]
        assert futures[1].cancel()  # the request gave up waiting
        model.gate.set()
        assert [futures[0].result(10).captions[1], futures[2].result(10).captions[1]] == [1, 3]
    finally:
        batcher.close()
    assert model.batches == [[0], [1, 3]]


def test_a_model_failure_fails_its_batch_only(caplog: pytest.LogCaptureFixture) -> None:
    model = StandIn()
    model.fail = True
    batcher = MicroBatcher(model, max_size=8, max_wait_ms=5000)
    try:
        with batcher.expecting(2) as ticket:
            futures = [batcher.submit(image(i), GREEDY, ticket) for i in (1, 2)]
        for future in futures:
            with pytest.raises(RuntimeError, match="model failed"):
                future.result(10)
        failures = [r for r in caplog.records if r.name == "service.microbatch"]
        assert [r.getMessage() for r in failures] == ["batch of 2 images failed"] and failures[0].exc_info
        model.fail = False
        assert batcher.submit(image(3), GREEDY).result(10).captions[1] == 3  # the thread lives on
    finally:
        batcher.close()


def test_close_finishes_queued_work_then_refuses_more() -> None:
    model = StandIn()
    model.gate.clear()
    batcher = MicroBatcher(model, max_size=2, max_wait_ms=0)
    futures = [batcher.submit(image(i), GREEDY) for i in range(5)]
    assert model.entered.wait(10)
    closing = threading.Thread(target=batcher.close, kwargs={"timeout": 10})
    closing.start()
    model.gate.set()
    closing.join(15)
    assert [f.result(0).captions[1] for f in futures] == list(range(5))
    assert not batcher._thread.is_alive()
    with pytest.raises(RuntimeError, match="^the batcher is closed$"):
        batcher.submit(image(9), GREEDY)


def test_queue_time_is_milliseconds_from_submit_to_the_batch_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """``queue_ms`` is (batch start - submit) in milliseconds: with the batcher's clock 1000 s ahead of the one that
    stamps submissions, it reads 1,000,000 ms plus the real wait, not a scaled value."""
    import service.microbatch as microbatch

    real = time.perf_counter
    monkeypatch.setattr(microbatch, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: real() + 1000)}))
    batcher = MicroBatcher(StandIn(), max_size=8, max_wait_ms=0)
    try:
        before = real()
        result = batcher.submit(image(1), GREEDY).result(10)
        waited_ms = (real() - before) * 1000
    finally:
        batcher.close()
    assert 1_000_000 <= result.queue_ms <= 1_000_000 + waited_ms
