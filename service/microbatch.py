"""Micro-batching: concurrent requests of one worker share one encoder + decoder batch.

Request threads preprocess their image (so bad uploads fail before they reach the queue), then
:meth:`MicroBatcher.submit` a tensor and its :class:`DecodingOptions`. One batching thread takes the oldest waiting
item, gathers more until the batch is full or the oldest has waited ``max_wait_ms``, and runs them together with
:meth:`Captioner.caption_tensors` and one options per image: the encoder runs once on the whole batch, then the
decoder once per distinct options group, on that group's slice of the feature grid, and the tags head once on the
whole grid. Each request gets its own captions and tags back through a future.

(Not to be confused with :mod:`captioner.batch`, the batch command's engine for folders of files.)

A batch waits only for images it knows are coming: request threads announce their images with
:meth:`MicroBatcher.expecting` before they preprocess them. So a lone request starts at once (no added latency), a
batch waits up to ``max_wait_ms`` (counted from its oldest image's arrival) for announced images still being
decoded, and images that queued up while the previous batch ran are taken together straight away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from captioner.api import Captioner, Captions
from captioner.decoding import DecodingOptions
from captioner.tags import DEFAULT_NUM_TAGS

log = logging.getLogger("service.microbatch")


@dataclass(frozen=True)
class BatchResult:
    """One image's captions (best first, with its top tags as ``captions.tags``) and how they were made."""

    captions: Captions
    batch_size: int  # images in the model batch this image was part of
    queue_ms: float  # time between submit and the start of its batch
    inference_ms: float  # encoder + decoder time of the whole batch


@dataclass
class _Item:
    tensor: torch.Tensor
    options: DecodingOptions
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


BatchObserver = Callable[[int, float], None]  # (batch size, inference seconds)


class Ticket:
    """Images a request announced to the batcher and has not submitted yet (see :meth:`MicroBatcher.expecting`)."""

    def __init__(self, batcher: MicroBatcher, count: int) -> None:
        self._batcher = batcher
        self.remaining = count

    def release(self, count: int = 1) -> None:
        """Withdraw ``count`` announced images (e.g. one failed to decode), so no batch waits for them."""
        self._batcher._withdraw(self, count)


class MicroBatcher:
    """Groups concurrent :meth:`submit` calls into batches run by one background thread."""

    def __init__(
        self, captioner: Captioner, max_size: int = 16, max_wait_ms: float = 10.0,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_size < 1 or max_wait_ms < 0:
            raise ValueError("max_size must be >= 1 and max_wait_ms >= 0")
        self.captioner = captioner
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.observer = observer
        self._items: deque[_Item] = deque()
        self._expected = 0  # images announced by request threads, still being preprocessed
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def expecting(self, count: int) -> Iterator[Ticket]:
        """Announce ``count`` images about to be submitted; whatever is not submitted is withdrawn on exit."""
        ticket = Ticket(self, count)
        with self._cond:
            self._expected += count
        try:
            yield ticket
        finally:
            ticket.release(ticket.remaining)

    def _withdraw(self, ticket: Ticket, count: int) -> None:
        with self._cond:
            count = min(count, ticket.remaining)
            ticket.remaining -= count
            self._expected -= count
            self._cond.notify_all()

    def submit(self, tensor: torch.Tensor, options: DecodingOptions, ticket: Ticket | None = None) -> Future:
        """Queue one preprocessed image (3, H, W); the future resolves to a :class:`BatchResult`."""
        item = _Item(tensor, options)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if ticket is not None and ticket.remaining > 0:
                ticket.remaining -= 1
                self._expected -= 1
            self._items.append(item)
            self._cond.notify_all()
        return item.future

    def close(self, timeout: float | None = 5.0) -> None:
        """Finish the queued work, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _next_batch(self) -> list[_Item] | None:
        """Wait for work, then take up to ``max_size`` images; None once closed and drained."""
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._items[0].submitted + self.max_wait
            while len(self._items) < self.max_size and self._expected > 0 and not self._closed:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(len(self._items), self.max_size)
            return [self._items.popleft() for _ in range(count)]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            # Requests that gave up waiting (cancelled futures) are dropped here, before they cost model time.
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)

    def _run_batch(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            tensors = torch.stack([item.tensor for item in batch])
            captions = self.captioner.caption_tensors(tensors, [item.options for item in batch], DEFAULT_NUM_TAGS)
        except Exception as exc:  # a model failure fails this batch's requests, never the thread
            log.exception("batch of %d images failed", len(batch))
            for item in batch:
                item.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        if self.observer is not None:
            self.observer(len(batch), elapsed)
        for item, result in zip(batch, captions, strict=True):
            queue_ms = (started - item.submitted) * 1000.0
            item.future.set_result(BatchResult(result, len(batch), queue_ms, elapsed * 1000.0))
