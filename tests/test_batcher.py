"""The Batcher's selection rules, with a recording batch function in place of a GPU."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from diffqueue.producer.models import GenerationRequest, Mode
from diffqueue.worker.batcher import Batcher, JobCanceled, JobExpired
from diffqueue.worker.jobs import BatchKey


class FakeJob(SimpleNamespace):
    """Only what the Batcher reads from a job: id, key, priority, arrival, image count, pixels."""


def job(job_id: str, model: str = "m", side: int = 64, images: int = 1, priority: int = 0) -> FakeJob:
    return FakeJob(
        id=job_id, key=BatchKey(model, Mode.txt2img, side, side, 4, None, ()), priority=priority,
        received_at=time.time(), request=GenerationRequest(prompt="x", num_images=images),
        pixels=side * side * images, expired=lambda: job_id.startswith("expired"),
    )


class Recorder:
    """Stands in for the sampler: records each batch; blocks the first batch until released."""

    def __init__(self, fail_ids: set[str] = frozenset()) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.fail_ids = fail_ids

    def __call__(self, jobs):
        if not self.batches:
            self.release.wait(10)
        self.batches.append([j.id for j in jobs])
        if self.fail_ids & {j.id for j in jobs}:
            raise RuntimeError("poisoned batch")
        return [[f"image-of-{j.id}"] * j.request.num_images for j in jobs]


def run(batcher: Batcher, recorder: Recorder, first, rest):
    batcher.start()
    futures = [batcher.submit(first)]
    time.sleep(0.2)  # the GPU thread is now busy with `first`; the rest queue up behind it
    futures += [batcher.submit(j) for j in rest]
    recorder.release.set()
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result(10))
        except Exception as error:
            outcomes.append(error)
    batcher.stop()
    return outcomes


def test_compatible_jobs_batch_together_and_others_wait_their_turn():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=8, max_batch_pixels=10**9)
    rest = [job("a1"), job("b1", model="other"), job("a2"), job("c1", side=128), job("a3")]
    outcomes = run(batcher, recorder, job("first"), rest)
    assert recorder.batches == [["first"], ["a1", "a2", "a3"], ["b1"], ["c1"]]
    assert [o.batch_size for o in outcomes] == [1, 3, 1, 3, 1, 3]


def test_max_batch_counts_images_and_pixel_budget_caps_a_batch():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=4, max_batch_pixels=3 * 64 * 64)
    rest = [job("a1", images=2), job("a2", images=2), job("a3"), job("a4"), job("a5")]
    run(batcher, recorder, job("first"), rest)
    assert recorder.batches[1:] == [["a1", "a3"], ["a2", "a4"], ["a5"]]


def test_priority_zero_goes_first_as_on_celery_redis():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=1, max_batch_pixels=10**9)
    rest = [job("low", priority=9), job("mid", priority=3), job("high", priority=0)]
    run(batcher, recorder, job("first"), rest)
    assert recorder.batches[1:] == [["high"], ["mid"], ["low"]]


def test_a_failing_batch_is_split_so_only_the_bad_job_fails():
    recorder = Recorder(fail_ids={"bad"})
    batcher = Batcher(recorder, max_batch=8, max_batch_pixels=10**9)
    outcomes = run(batcher, recorder, job("first"), [job("ok1"), job("bad"), job("ok2"), job("ok3")])
    assert isinstance(outcomes[2], RuntimeError)
    assert [o.images for i, o in enumerate(outcomes) if i != 2] == [
        ["image-of-first"], ["image-of-ok1"], ["image-of-ok2"], ["image-of-ok3"]]


def test_canceled_and_expired_jobs_never_reach_the_gpu():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=8, max_batch_pixels=10**9, is_canceled=lambda i: i == "gone")
    outcomes = run(batcher, recorder, job("first"), [job("gone"), job("expired-1"), job("kept")])
    assert isinstance(outcomes[1], JobCanceled) and isinstance(outcomes[2], JobExpired)
    assert recorder.batches[1:] == [["kept"]]


@pytest.mark.parametrize("wait_ms, expected", [(0, [["a0"], ["a1"]]), (800, [["a0", "a1"]])])
def test_max_wait_ms_holds_a_batch_open_only_when_asked(wait_ms, expected):
    recorder = Recorder()
    recorder.release.set()
    batcher = Batcher(recorder, max_batch=8, max_batch_pixels=10**9, max_wait_ms=wait_ms)
    batcher.start()
    futures = [batcher.submit(job("a0"))]
    time.sleep(0.3)
    futures.append(batcher.submit(job("a1")))
    for future in futures:
        future.result(10)
    batcher.stop()
    assert recorder.batches == expected


def test_jobs_of_the_resident_model_go_first_but_the_oldest_waits_only_so_long():
    resident = {"loaded"}
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=1, max_batch_pixels=10**9, is_resident=lambda m: m in resident,
                      max_model_wait_s=60)
    rest = [job("cold-1", model="cold"), job("warm-1", model="loaded"), job("warm-2", model="loaded")]
    run(batcher, recorder, job("first", model="loaded"), rest)
    assert recorder.batches[1:] == [["warm-1"], ["warm-2"], ["cold-1"]]

    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=1, max_batch_pixels=10**9, is_resident=lambda m: m in resident,
                      max_model_wait_s=0.1)
    run(batcher, recorder, job("first", model="loaded"), rest)
    assert recorder.batches[1] == ["cold-1"], "past max_model_wait_s the oldest job goes first"
