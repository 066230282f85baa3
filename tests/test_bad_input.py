"""Bad input fails only its own job, with the field named and a terminal job.failed webhook."""

from __future__ import annotations

import pytest
from kombu import Connection

from tests.helpers import wait_for, wait_result, webhook_bodies

BAD_REQUESTS = [
    ({"seed": 1}, "prompt"),
    ({"prompt": "x", "width": -64}, "width"),
    ({"prompt": "x", "height": 1_000_000}, "height"),
    ({"prompt": "x", "height": 4096}, "height"),  # within the contract, above the model's pixel limit
    ({"prompt": "x", "seed": "seven"}, "seed"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 500}, "num_inference_steps"),  # above the model's limit
    ({"prompt": "x", "guidance_scale": -1.0}, "guidance_scale"),
    ({"prompt": "x", "model": "no-such-model"}, "model"),
    ({"prompt": "x", "mode": "video"}, "mode"),
    ({"prompt": "x", "mode": "inpaint", "model": "sdxl", "image_url": "https://example.com/a.png",
      "mask_url": "https://example.com/m.png"}, "mode"),  # SDXL inpaint is not served yet
    ({"prompt": "x", "width": 63}, "width"),  # not a multiple of the VAE factor
    ({"prompt": "x", "num_images": 9}, "num_images"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"prompt": "x", "callback_url": "ftp://example.com/hook"}, "callback_url"),
]


@pytest.mark.parametrize("request_body, field", BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS])
def test_invalid_field_fails_the_job_naming_the_field(worker, celery_sender, request_body, field):
    result = wait_result(celery_sender, worker.send(celery_sender, request_body), timeout=60)
    assert result["status"] == "failed"
    assert result["error"]["field"] == field
    assert result["error"]["code"] in ("invalid_request", "unsupported")
    assert field in result["error"]["message"]


def test_bad_jobs_send_job_failed_and_the_next_valid_job_succeeds(
    worker, celery_sender, httpserver, webhook_secret
):
    httpserver.expect_request("/hooks/bad").respond_with_data("ok")
    hook = httpserver.url_for("/hooks/bad")
    garbage = [
        worker.send(celery_sender, {"prompt": "x", "width": -1, "callback_url": hook, "metadata": {"k": 1}}),
        worker.send(celery_sender, kwargs={"request": "not an object"}),
        worker.send(celery_sender, kwargs={"prompt": "x"}),
    ]
    positional = "positional-garbage"
    celery_sender.send_task("diffqueue.generate", args=[1, "two", None], task_id=positional, queue=worker.queue)
    valid = worker.send(celery_sender, {"prompt": "after the garbage", "seed": 9, "callback_url": hook})

    for job_id in [*garbage, positional]:
        assert wait_result(celery_sender, job_id, timeout=60)["status"] == "failed"
    assert wait_result(celery_sender, positional)["error"]["field"] == "request"
    assert wait_result(celery_sender, valid)["status"] == "succeeded"

    failed = wait_for(lambda: [b for b in webhook_bodies(httpserver, webhook_secret)
                               if b["type"] == "job.failed" and b["data"]["id"] == garbage[0]])
    assert failed[0]["data"]["error"]["field"] == "width"
    assert failed[0]["data"]["metadata"] == {"k": 1}
    assert worker.process.poll() is None


def test_private_callback_is_refused_when_not_allowed(redis_server, models_file, webhook_secret, tmp_path,
                                                      celery_sender):
    from tests.helpers import WorkerProcess

    strict = WorkerProcess(redis_server.url, models_file, tmp_path / "images", webhook_secret,
                           DIFFQUEUE_ALLOW_PRIVATE_CALLBACKS="0").start()
    try:
        for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest", "http://10.1.2.3/x"):
            result = wait_result(celery_sender, strict.send(celery_sender, {"prompt": "x", "callback_url": url}))
            assert result["status"] == "failed" and result["error"]["field"] == "callback_url"
            assert "internal address" in result["error"]["message"]
    finally:
        assert strict.stop() == 0


def test_undecodable_message_fails_cleanly(worker, redis_server, celery_sender):
    """A pickle payload is never deserialized: the job fails and the worker goes on."""
    job_id = "pickled-message"
    with Connection(redis_server.url) as connection:
        producer = connection.Producer(serializer="json")
        producer.publish(
            b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.", routing_key=worker.queue,
            content_type="application/x-python-serialize", content_encoding="binary",
            headers={"id": job_id, "task": "diffqueue.generate", "lang": "py", "argsrepr": "", "kwargsrepr": ""},
            declare=[],
        )
    result = wait_result(celery_sender, job_id, timeout=60)
    assert result["status"] == "failed" and result["error"]["code"] == "invalid_message"
    ok = wait_result(celery_sender, worker.send(celery_sender, {"prompt": "still alive", "seed": 2}))
    assert ok["status"] == "succeeded"
