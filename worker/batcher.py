"""The Batcher: one GPU thread that greedily groups compatible pending jobs.

Celery threads call `submit(job)` and block on the returned future. Whenever the GPU thread is free it
takes the highest-priority oldest pending job plus every pending job with the same `BatchKey`, up to
`max_batch` images and `max_batch_pixels`, and runs them as one batch. It never waits for a batch to
fill unless `max_wait_ms` > 0. Jobs of models already in memory go first, for a bounded time.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL import Image

from .jobs import Job

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    images: list[Image.Image]
    batch_size: int  # images generated together in one denoising loop
    started_at: float
    seconds: float


class JobCanceled(Exception):
    pass


class JobExpired(Exception):
    """The job's expires_at passed before its batch started."""


class JobReturned(Exception):
    """The worker is draining: the job was not started and goes back to the queue."""


def free_accelerator_memory() -> None:
    """After a failed batch (often an OOM), give cached blocks back before the halves run."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


RunBatch = Callable[[list[Job]], list[list[Image.Image]]]


@dataclass(order=True)
class _Pending:
    priority: int
    sequence: int
    job: Job = field(compare=False)
    future: Future = field(compare=False)


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_batch: int,
        max_batch_pixels: int,
        max_wait_ms: int = 0,
        is_canceled: Callable[[str], bool] = lambda job_id: False,
        is_resident: Callable[[str], bool] = lambda model: True,
        max_model_wait_s: float = 30.0,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_batch_pixels = max_batch_pixels
        self.max_wait_s = max_wait_ms / 1000
        self.is_canceled = is_canceled
        self.is_resident = is_resident
        self.max_model_wait_s = max_model_wait_s
        self._pending: list[_Pending] = []
        self._sequence = itertools.count()
        self._changed = threading.Condition()
        self._stopping = False
        self._draining = False
        self._thread = threading.Thread(target=self._loop, name="diffqueue-gpu", daemon=True)
        self.busy_since: float | None = None  # when the batch on the GPU started; None when idle

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout)

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        with self._changed:
            if self._draining:
                future.set_exception(JobReturned(job.id))
                return future
            self._pending.append(_Pending(job.priority, next(self._sequence), job, future))
            self._changed.notify_all()
        return future

    def drain(self) -> int:
        """Scale-in: start no new batch and hand every pending job back; the batch in flight finishes."""
        with self._changed:
            self._draining = True
            returned, self._pending = self._pending, []
            self._changed.notify_all()
        for item in returned:
            item.future.set_exception(JobReturned(item.job.id))
        return len(returned)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending_count(self) -> int:
        with self._changed:
            return len(self._pending)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Pending] | None:
        with self._changed:
            while not self._pending and not self._stopping:
                self._changed.wait()
            if self._stopping and not self._pending:
                return None
            oldest = self._first_choice()
            deadline = oldest.job.received_at + self.max_wait_s
            batch = self._select(oldest)
            while self._images(batch) < self.max_batch and not self._stopping:
                remaining = deadline - time.time()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
                batch = self._select(oldest)
            for item in batch:
                self._pending.remove(item)
            return batch

    def _first_choice(self) -> _Pending:
        """The oldest job, unless its model is not loaded: then the oldest job of a loaded model goes
        first, until the oldest has waited max_model_wait_s. Swapping models costs seconds."""
        oldest = min(self._pending)
        if self.is_resident(oldest.job.key.model) or time.time() - oldest.job.received_at >= self.max_model_wait_s:
            return oldest
        resident = [item for item in self._pending if self.is_resident(item.job.key.model)]
        return min(resident) if resident else oldest

    def _select(self, oldest: _Pending) -> list[_Pending]:
        batch, images, pixels = [oldest], oldest.job.request.num_images, oldest.job.pixels
        for item in sorted(self._pending):
            if item is oldest or item.job.key != oldest.job.key:
                continue
            if images + item.job.request.num_images > self.max_batch:
                continue
            if pixels + item.job.pixels > self.max_batch_pixels:
                continue
            batch.append(item)
            images += item.job.request.num_images
            pixels += item.job.pixels
        return batch

    @staticmethod
    def _images(batch: list[_Pending]) -> int:
        return sum(item.job.request.num_images for item in batch)

    def _run(self, batch: list[_Pending]) -> None:
        live = []
        for item in batch:
            if self.is_canceled(item.job.id):
                item.future.set_exception(JobCanceled(item.job.id))
            elif item.job.expired():
                item.future.set_exception(JobExpired(item.job.id))
            else:
                live.append(item)
        if live:
            self._generate(live)

    def _generate(self, batch: list[_Pending]) -> None:
        """Run a batch; on failure split it in halves, so one bad job cannot fail the others."""
        started = self.busy_since = time.time()
        try:
            images = self.run_batch([item.job for item in batch])
        except Exception as error:
            self.busy_since = None
            free_accelerator_memory()
            if len(batch) == 1:
                log.exception("job %s failed in generation", batch[0].job.id)
                batch[0].future.set_exception(error)
                return
            log.warning("batch of %d jobs failed (%s); retrying in halves", len(batch), error)
            half = len(batch) // 2
            self._generate(batch[:half])
            self._generate(batch[half:])
            return
        self.busy_since = None
        seconds = time.time() - started
        size = self._images(batch)
        for item, job_images in zip(batch, images, strict=True):
            item.future.set_result(BatchOutcome(job_images, size, started, seconds))
