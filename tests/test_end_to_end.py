"""The contract end to end: plain Celery send_task -> worker -> PNG on storage -> result + signed webhooks."""

from __future__ import annotations

import numpy as np
import torch

from tests.helpers import max_pixel_difference, read_image, wait_for, wait_result, webhook_bodies


def test_plain_send_task_produces_the_stock_image_and_signed_webhooks(
    worker, celery_sender, httpserver, webhook_secret, stock_pipelines
):
    httpserver.expect_request("/hooks/e2e").respond_with_data("ok")
    request = {
        "prompt": "a lighthouse at dusk", "seed": 1234, "guidance_scale": 6.0, "num_inference_steps": 4,
        "width": 64, "height": 48, "callback_url": httpserver.url_for("/hooks/e2e"),
        "metadata": {"order": 17, "tags": ["a", "b"]},
    }
    job_id = worker.send(celery_sender, request)
    result = wait_result(celery_sender, job_id)

    assert result["id"] == job_id
    assert result["status"] == "succeeded", result
    assert result["metadata"] == {"order": 17, "tags": ["a", "b"]}
    assert result["model"] == "sd" and result["revision"] == "local"
    [image] = result["images"]
    assert (image["width"], image["height"], image["seed"]) == (64, 48, 1234)
    assert image["content_type"] == "image/png"
    data, pixels = read_image(image["url"])
    assert pixels.shape == (48, 64, 3)

    stock = stock_pipelines("sd")(
        prompt=request["prompt"], guidance_scale=6.0, num_inference_steps=4, width=64, height=48,
        generator=torch.Generator("cpu").manual_seed(1234),
    ).images[0]
    assert max_pixel_difference(pixels, np.asarray(stock.convert("RGB"))) <= 2

    events = wait_for(lambda: [b for b in webhook_bodies(httpserver, webhook_secret)
                               if b["data"]["id"] == job_id and b["type"] == "job.succeeded"])
    assert events[0]["data"]["images"][0]["sha256"] == image["sha256"]
    types = [b["type"] for b in webhook_bodies(httpserver, webhook_secret) if b["data"]["id"] == job_id]
    # Deliveries run in parallel, so receivers must not rely on order (Standard Webhooks says the same).
    assert sorted(set(types)) == ["job.started", "job.succeeded"]


def test_same_job_twice_gives_the_same_png_bytes(worker, celery_sender):
    request = {"prompt": "a red fox in snow", "seed": 77, "guidance_scale": 3.0, "model": "sdxl"}
    first = wait_result(celery_sender, worker.send(celery_sender, request))
    second = wait_result(celery_sender, worker.send(celery_sender, request))
    assert first["status"] == second["status"] == "succeeded"
    first_bytes, _ = read_image(first["images"][0]["url"])
    second_bytes, _ = read_image(second["images"][0]["url"])
    assert first_bytes == second_bytes
    assert first["images"][0]["sha256"] == second["images"][0]["sha256"]


def test_different_seeds_give_different_images_and_unset_seed_is_reported(worker, celery_sender):
    one = wait_result(celery_sender, worker.send(celery_sender, {"prompt": "a cat", "seed": 1, "num_images": 2}))
    drawn = wait_result(celery_sender, worker.send(celery_sender, {"prompt": "a cat"}))
    assert [i["seed"] for i in one["images"]] == [1, 2]
    assert one["images"][0]["sha256"] != one["images"][1]["sha256"]
    assert drawn["status"] == "succeeded" and isinstance(drawn["images"][0]["seed"], int)


def test_redelivered_job_id_returns_the_recorded_result(worker, celery_sender):
    request = {"prompt": "a boat", "seed": 5}
    job_id = worker.send(celery_sender, request)
    first = wait_result(celery_sender, job_id)
    worker.send(celery_sender, {"prompt": "something else entirely", "seed": 6}, job_id=job_id)
    wait_for(lambda: "already succeeded" in worker.log_tail(200), timeout=60)
    assert wait_result(celery_sender, job_id) == first


def test_producer_client_submit_is_idempotent_and_reports_status(worker, redis_server):
    from diffqueue.producer import Client, GenerationRequest, QueueSettings

    client = Client(QueueSettings(broker_url=redis_server.url, queue=worker.queue))
    request = GenerationRequest(prompt="a tower", seed=3, model="sd-turbo")
    job_id = client.submit(request, job_id="idempotent-job-1")
    assert client.submit(request, job_id="idempotent-job-1") == job_id
    result = client.wait(job_id, timeout=120)
    assert result.status.value == "succeeded" and result.model == "sd-turbo"
    assert client.status(job_id) == result
    assert client.pending() == 0
    client.close()
