"""Nothing lost, nothing run twice: kill -9, long jobs past the visibility timeout, SIGTERM scale-in."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import redis

from tests.helpers import WorkerProcess, wait_for, wait_result

LEASE = {"DIFFQUEUE_VISIBILITY_TIMEOUT_S": "6", "DIFFQUEUE_RESTORE_INTERVAL_S": "2"}


@pytest.fixture
def slow_models_file(tiny_model_dirs, tmp_path) -> Path:
    """The tiny SD model with room for slow jobs (many steps), so a signal can land mid-batch."""
    path = tmp_path / "slow.toml"
    path.write_text(f'default = "sd"\n[models.sd]\nsource = "{tiny_model_dirs["sd"]}"\n'
                    'defaults = { num_inference_steps = 4, width = 64, height = 64 }\n'
                    'limits = { max_steps = 2000, max_pixels = 16384 }\n')
    return path


def unacked(redis_url: str) -> int:
    return redis.Redis.from_url(redis_url).hlen("unacked")


def runs(workers: list[WorkerProcess], job_id: str) -> int:
    """How many times any of these workers finished the job."""
    return sum(len(re.findall(rf"job {re.escape(job_id)} succeeded", w.log_tail(100_000))) for w in workers)


def runs_once_each(workers: list[WorkerProcess], ids: list[str]) -> list[int]:
    # A result is recorded just before its log line is written: let the lines land, then count.
    wait_for(lambda: all(runs(workers, job_id) for job_id in ids), timeout=10)
    time.sleep(1)
    return [runs(workers, job_id) for job_id in ids]


def test_a_killed_workers_jobs_run_once_elsewhere_within_two_minutes(
    redis_server, models_file, webhook_secret, tmp_path, celery_sender
):
    # The holder waits (up to 10 minutes) for a full batch, so it sits on every job it takes.
    holder = WorkerProcess(redis_server.url, models_file, tmp_path / "a", webhook_secret,
                           DIFFQUEUE_MAX_WAIT_MS="600000", DIFFQUEUE_MAX_BATCH="64", **LEASE).start()
    ids = [holder.send(celery_sender, {"prompt": f"held {i}", "seed": i}) for i in range(6)]
    try:
        wait_for(lambda: unacked(redis_server.url) == 6, timeout=30)
        time.sleep(8)  # longer than the visibility timeout: the live holder's lease renewals keep them its own
        assert unacked(redis_server.url) == 6
    finally:
        holder.kill()
    killed_at = time.monotonic()
    rescuer = WorkerProcess(redis_server.url, models_file, tmp_path / "b", webhook_secret, queue=holder.queue,
                            **LEASE).start()
    try:
        results = [wait_result(celery_sender, job_id, timeout=120) for job_id in ids]
        recovered_in = time.monotonic() - killed_at
        assert all(r["status"] == "succeeded" for r in results)
        assert recovered_in < 120, recovered_in
        assert runs_once_each([holder, rescuer], ids) == [1] * 6
    finally:
        rescuer.stop()


def test_a_job_longer_than_the_visibility_timeout_is_delivered_once(
    redis_server, models_file, webhook_secret, tmp_path, celery_sender
):
    holder = WorkerProcess(redis_server.url, models_file, tmp_path / "a", webhook_secret,
                           DIFFQUEUE_MAX_WAIT_MS="20000", DIFFQUEUE_MAX_BATCH="8", **LEASE).start()
    job_id = holder.send(celery_sender, {"prompt": "a long job", "seed": 1})
    wait_for(lambda: unacked(redis_server.url) == 1, timeout=30)
    # A second live worker on the same queue would re-deliver the job to itself if the lease lapsed.
    other = WorkerProcess(redis_server.url, models_file, tmp_path / "b", webhook_secret, queue=holder.queue,
                          **LEASE).start()
    try:
        result = wait_result(celery_sender, job_id, timeout=90)
        assert result["status"] == "succeeded" and result["timings"]["queued"] > 15
        assert runs_once_each([holder], [job_id]) == [1] and job_id not in other.log_tail(100_000)
    finally:
        other.stop()
        holder.stop()


def test_sigterm_to_every_process_finishes_the_batch_and_returns_the_rest(
    redis_server, slow_models_file, webhook_secret, tmp_path, celery_sender
):
    worker = WorkerProcess(redis_server.url, slow_models_file, tmp_path / "a", webhook_secret,
                           DIFFQUEUE_MAX_BATCH="1", DIFFQUEUE_CONCURRENCY="8", **LEASE).start()
    ids = [worker.send(celery_sender, {"prompt": f"slow {i}", "seed": i, "num_inference_steps": 400})
           for i in range(5)]
    try:
        wait_for(lambda: unacked(redis_server.url) == 5, timeout=30)
        time.sleep(0.5)  # the first batch is on the "GPU"
        os.killpg(worker.process.pid, signal.SIGTERM)  # as Azure Container Apps does: every process
        assert worker.process.wait(timeout=180) == 0
    finally:
        worker.kill()

    finished = [job_id for job_id in ids if runs([worker], job_id)]
    assert len(finished) == 1, "exactly the batch in flight finishes"
    queue_length = redis.Redis.from_url(redis_server.url).llen(worker.queue)
    assert queue_length == 4 and unacked(redis_server.url) == 0, "the others are back in the queue"

    successor = WorkerProcess(redis_server.url, slow_models_file, tmp_path / "b", webhook_secret,
                              queue=worker.queue, **LEASE).start()
    try:
        assert all(wait_result(celery_sender, j, timeout=240)["status"] == "succeeded" for j in ids)
        assert runs_once_each([worker, successor], ids) == [1] * 5
    finally:
        successor.stop()


def test_oom_splits_the_batch_and_a_job_failing_alone_is_out_of_memory(
    redis_server, models_file, webhook_secret, tmp_path, celery_sender
):
    worker = WorkerProcess(redis_server.url, models_file, tmp_path / "a", webhook_secret,
                           DIFFQUEUE_FAULT_OOM_ABOVE_BATCH="2", DIFFQUEUE_MAX_WAIT_MS="3000",
                           DIFFQUEUE_MAX_BATCH="16").start()
    try:
        small = [worker.send(celery_sender, {"prompt": f"fits {i}", "seed": i}) for i in range(5)]
        too_big = worker.send(celery_sender, {"prompt": "three images", "seed": 9, "num_images": 3})
        results = [wait_result(celery_sender, job_id) for job_id in small]
        assert all(r["status"] == "succeeded" for r in results)
        assert max(r["batch_size"] for r in results) <= 2, "the batch of 8 images was split until it fit"
        failed = wait_result(celery_sender, too_big)
        assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory"
        assert "retrying in halves" in worker.log_tail(2000)
    finally:
        worker.stop()


def test_expired_job_fails_with_expired_and_a_webhook(worker, celery_sender, httpserver, webhook_secret,
                                                      redis_server):
    from datetime import datetime, timedelta, timezone

    from diffqueue.producer import Client, GenerationRequest, QueueSettings

    from tests.helpers import webhook_bodies

    httpserver.expect_request("/hooks/expired").respond_with_data("ok")
    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    job_id = worker.send(celery_sender, {"prompt": "late", "expires_at": past,
                                         "callback_url": httpserver.url_for("/hooks/expired")})
    result = wait_result(celery_sender, job_id)
    assert result["status"] == "failed" and result["error"]["code"] == "expired"
    assert wait_for(lambda: [b for b in webhook_bodies(httpserver, webhook_secret)
                             if b["type"] == "job.failed" and b["data"]["id"] == job_id])
    client = Client(QueueSettings(broker_url=redis_server.url, queue=worker.queue))
    fresh = client.submit(GenerationRequest(prompt="in time", seed=1), ttl_s=300)
    assert client.wait(fresh, timeout=60).status.value == "succeeded"
    assert client.status(job_id).error.code == "expired"
    client.close()


def test_poison_message_fails_once_terminally_after_max_deliveries(
    redis_server, models_file, webhook_secret, tmp_path, celery_sender
):
    settings = {"DIFFQUEUE_FAULT_CRASH_ON_PROMPT": "poison", "DIFFQUEUE_MAX_DELIVERIES": "3", **LEASE}
    first = WorkerProcess(redis_server.url, models_file, tmp_path / "a", webhook_secret, **settings)
    job_id = first.send(celery_sender, {"prompt": "poison", "seed": 1})
    healthy = first.send(celery_sender, {"prompt": "fine", "seed": 2})
    crashes, worker = 0, first
    for _attempt in range(6):  # a supervisor (Container Apps) restarts the worker each time it dies
        worker.launch()
        try:
            result = wait_result(celery_sender, job_id, timeout=20)
            break
        except Exception:
            if worker.process.poll() is not None:
                crashes += 1
            worker.kill()
            worker = WorkerProcess(redis_server.url, models_file, tmp_path / "a", webhook_secret,
                                   queue=first.queue, **settings)
    try:
        assert result["status"] == "failed" and result["error"]["code"] == "poison_message"
        assert crashes == 3
        assert wait_result(celery_sender, healthy, timeout=60)["status"] == "succeeded"
    finally:
        worker.stop()



def test_redis_restart_loses_no_submitted_job(models_file, webhook_secret, tmp_path):
    from diffqueue.producer import Client, GenerationRequest, QueueSettings

    from diffqueue.local_redis import LocalRedis

    with LocalRedis(tmp_path / "redis") as server:  # its own server: the others keep running undisturbed
        worker = WorkerProcess(server.url, models_file, tmp_path / "a", webhook_secret, **LEASE).start()
        client = Client(QueueSettings(broker_url=server.url, queue=worker.queue, visibility_timeout_s=6,
                                      restore_interval_s=2))
        try:
            before = [client.submit(GenerationRequest(prompt=f"before {i}", seed=i)) for i in range(6)]
            wait_for(lambda: unacked(server.url) > 0, timeout=30)
            server.restart(down_s=8, kill=True)  # longer than the lease: held jobs must not run twice
            after = [client.submit(GenerationRequest(prompt=f"after {i}", seed=i)) for i in range(4)]
            results = [client.wait(job_id, timeout=180) for job_id in before + after]
            assert [r.status.value for r in results] == ["succeeded"] * 10
            assert worker.process.poll() is None, "the worker survived the restart"
            assert runs_once_each([worker], before + after) == [1] * 10
        finally:
            client.close()
            worker.stop()
