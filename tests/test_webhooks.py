"""Webhook delivery against a real HTTP receiver and real Redis; every body verified with standardwebhooks."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis
from diffqueue.producer.connection import RedisKeys
from diffqueue.producer.models import JobResult, JobState
from diffqueue.worker.webhooks import WebhookDispatcher, WebhookOutbox, retry_delay, webhook_id
from pytest_httpserver import HTTPServer
from werkzeug import Response

from diffqueue.local_redis import free_port
from tests.helpers import wait_for, webhook_bodies


@pytest.fixture
def keys(request) -> RedisKeys:
    return RedisKeys(f"hooktest-{request.node.name}")


@pytest.fixture
def make_outbox(redis_server, keys, webhook_secret):
    dispatchers = []

    def make(start: bool = True, **options) -> WebhookOutbox:
        settings = {"base_s": 0.2, "max_s": 1.0, "horizon_s": 30.0, "allow_private": True, **options}
        outbox = WebhookOutbox(redis.Redis.from_url(redis_server.url), keys, webhook_secret, **settings)
        if start:
            dispatcher = WebhookDispatcher(outbox, poll_s=0.05)
            dispatcher.start()
            dispatchers.append(dispatcher)
        return outbox

    yield make
    for dispatcher in dispatchers:
        dispatcher.stop()


def result(job_id: str, status: JobState = JobState.succeeded) -> JobResult:
    return JobResult(id=job_id, status=status, model="m", metadata={"job": job_id})


def test_500_then_200_is_delivered_with_a_stable_webhook_id(make_outbox, httpserver, webhook_secret):
    answers = iter([Response("boom", status=500), Response("boom", status=500), Response("ok", status=200)])
    httpserver.expect_request("/flaky").respond_with_handler(lambda request: next(answers))
    make_outbox().enqueue(httpserver.url_for("/flaky"), "job.succeeded", result("flaky-job"))

    bodies = wait_for(lambda: (b := webhook_bodies(httpserver, webhook_secret)) and len(b) == 3 and b)
    assert {b["headers"]["webhook-id"] for b in bodies} == {bodies[0]["headers"]["webhook-id"]}
    assert all(b["type"] == "job.succeeded" and b["data"]["id"] == "flaky-job" for b in bodies)
    time.sleep(1.0)
    assert len(httpserver.log) == 3, "a delivered event is not sent again"


def test_an_event_is_enqueued_once_however_often_the_job_is_redelivered(make_outbox, httpserver, webhook_secret):
    httpserver.expect_request("/once").respond_with_data("ok")
    outbox = make_outbox()
    assert outbox.enqueue(httpserver.url_for("/once"), "job.succeeded", result("redelivered-job")) is True
    wait_for(lambda: len(httpserver.log) == 1)
    # A re-delivered job that finds its terminal result calls enqueue again, before and after delivery.
    assert outbox.enqueue(httpserver.url_for("/once"), "job.succeeded", result("redelivered-job")) is False
    assert outbox.enqueue(httpserver.url_for("/once"), "job.failed", result("redelivered-job")) is True
    wait_for(lambda: len(httpserver.log) == 2)
    time.sleep(1.0)
    assert [b["type"] for b in webhook_bodies(httpserver, webhook_secret)] == ["job.succeeded", "job.failed"]


def test_receiver_down_then_up(make_outbox, keys, webhook_secret):
    port = free_port()
    outbox = make_outbox()
    outbox.enqueue(f"http://127.0.0.1:{port}/late", "job.failed", result("down-job", JobState.failed))
    pending_key = keys.webhook(webhook_id("down-job", "job.failed"))
    wait_for(lambda: b'"attempts":2' in (outbox.redis.get(pending_key) or b""), timeout=10)
    server = HTTPServer(host="127.0.0.1", port=port)
    server.expect_request("/late").respond_with_data("ok")
    server.start()
    try:
        bodies = wait_for(lambda: webhook_bodies(server, webhook_secret), timeout=10)
        assert bodies[0]["type"] == "job.failed" and bodies[0]["data"]["status"] == "failed"
    finally:
        server.stop()


def test_pending_deliveries_survive_a_worker_restart(make_outbox, httpserver, webhook_secret):
    httpserver.expect_request("/later").respond_with_data("ok")
    before_restart = make_outbox(start=False, lease_s=1.0)
    before_restart.enqueue(httpserver.url_for("/later"), "job.succeeded", result("survivor"))
    claimed = before_restart.claim_due()  # a worker claims it and dies before posting
    assert claimed and not httpserver.log

    make_outbox()  # the restarted worker's dispatcher takes it once the dead worker's lease runs out
    bodies = wait_for(lambda: webhook_bodies(httpserver, webhook_secret), timeout=15)
    assert bodies[0]["data"]["id"] == "survivor"


def test_restarted_dispatcher_delivers_unclaimed_events(make_outbox, httpserver, webhook_secret):
    httpserver.expect_request("/queued").respond_with_data("ok")
    make_outbox(start=False).enqueue(httpserver.url_for("/queued"), "job.canceled", result("c", JobState.canceled))
    make_outbox()
    assert wait_for(lambda: webhook_bodies(httpserver, webhook_secret))[0]["type"] == "job.canceled"


def test_410_stops_and_dead_letters_then_cli_lists_and_replays(
    make_outbox, httpserver, webhook_secret, redis_server, keys
):
    answers = iter([Response("gone", status=410), Response("ok", status=200)])
    httpserver.expect_request("/gone").respond_with_handler(lambda request: next(answers))
    outbox = make_outbox()
    outbox.enqueue(httpserver.url_for("/gone"), "job.succeeded", result("gone-job"))
    dead = wait_for(outbox.dead, timeout=10)
    assert len(httpserver.log) == 1 and "410" in dead[0].last_error

    env = {"DIFFQUEUE_BROKER_URL": redis_server.url, "DIFFQUEUE_KEY_PREFIX": keys.prefix, "PATH": ""}
    listed = subprocess.run([sys.executable, "-m", "diffqueue.cli", "webhooks", "dead"], env=env,
                            capture_output=True, text=True, check=True).stdout
    assert dead[0].id in listed and "410" in listed
    replayed = subprocess.run([sys.executable, "-m", "diffqueue.cli", "webhooks", "replay"], env=env,
                              capture_output=True, text=True, check=True).stdout
    assert "replayed 1" in replayed
    wait_for(lambda: len(httpserver.log) == 2, timeout=10)
    assert not outbox.dead()


def test_retry_after_is_honoured(make_outbox, httpserver, webhook_secret):
    answers = iter([Response("slow down", status=429, headers={"Retry-After": "2"}), Response("ok")])
    httpserver.expect_request("/throttle").respond_with_handler(lambda request: next(answers))
    make_outbox().enqueue(httpserver.url_for("/throttle"), "job.succeeded", result("throttled"))
    wait_for(lambda: len(httpserver.log) == 2, timeout=10)
    first, second = (entry[0] for entry in httpserver.log)
    gap = int(second.headers["webhook-timestamp"]) - int(first.headers["webhook-timestamp"])
    assert gap >= 1  # timestamps are whole seconds; base backoff alone would be under 0.2 s


def test_exhausted_horizon_dead_letters_terminal_events(make_outbox, httpserver):
    httpserver.expect_request("/always-500").respond_with_data("no", status=500)
    outbox = make_outbox(horizon_s=1.5)
    outbox.enqueue(httpserver.url_for("/always-500"), "job.succeeded", result("doomed"))
    dead = wait_for(outbox.dead, timeout=10)
    assert dead[0].attempts >= 2 and "HTTP 500" in dead[0].last_error


def test_private_url_is_refused_at_delivery_without_the_switch(make_outbox, httpserver):
    httpserver.expect_request("/private").respond_with_data("ok")
    outbox = make_outbox(allow_private=False)
    outbox.enqueue(httpserver.url_for("/private"), "job.succeeded", result("private"))
    dead = wait_for(outbox.dead, timeout=10)
    assert "internal address" in dead[0].last_error and not httpserver.log


def test_backoff_grows_and_is_capped():
    delays = [retry_delay(attempt, base_s=5, max_s=600) for attempt in range(1, 12)]
    assert 2.5 <= delays[0] <= 5 and 5 <= delays[1] <= 10
    assert all(300 <= d <= 600 for d in delays[8:])


def test_worker_killed_with_deliveries_pending_delivers_them_after_restart(
    redis_server, models_file, webhook_secret, tmp_path, celery_sender
):
    from tests.helpers import WorkerProcess, wait_result

    port = free_port()
    settings = {"DIFFQUEUE_WEBHOOK_LEASE_S": "2", "DIFFQUEUE_WEBHOOK_RETRY_BASE_S": "1"}
    first = WorkerProcess(redis_server.url, models_file, tmp_path / "images", webhook_secret, **settings).start()
    job_id = first.send(celery_sender, {"prompt": "x", "seed": 4, "callback_url": f"http://127.0.0.1:{port}/after"})
    assert wait_result(celery_sender, job_id)["status"] == "succeeded"
    time.sleep(1.0)  # at least one delivery attempt has failed against the closed port
    first.process.kill()
    first.process.wait()

    receiver = HTTPServer(host="127.0.0.1", port=port)
    receiver.expect_request("/after").respond_with_data("ok")
    receiver.start()
    restarted = WorkerProcess(redis_server.url, models_file, tmp_path / "images", webhook_secret,
                              queue=first.queue, **settings).start()
    try:
        bodies = wait_for(lambda: [b for b in webhook_bodies(receiver, webhook_secret)
                                   if b["type"] == "job.succeeded"], timeout=30)
        assert bodies[0]["data"]["id"] == job_id
    finally:
        restarted.stop()
        receiver.stop()
