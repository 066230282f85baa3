"""The producer SDK stays light, and the CLI's producer commands work against a real worker."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from diffqueue.producer import Client, GenerationRequest, QueueSettings

from tests.helpers import wait_for, webhook_bodies


def test_producer_imports_neither_torch_nor_the_worker():
    code = ("import sys, diffqueue.producer, diffqueue.cli; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'diffqueue.worker') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_submit_wait_and_status(worker, redis_server):
    env = {"DIFFQUEUE_BROKER_URL": redis_server.url, "DIFFQUEUE_QUEUE": worker.queue, "PATH": ""}
    submitted = subprocess.run(
        [sys.executable, "-m", "diffqueue.cli", "submit", "a lighthouse", "--seed", "5", "--width", "48",
         "--metadata", '{"ticket": 7}', "--job-id", "cli-job-1", "--wait"],
        env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    result = json.loads(submitted.stdout)
    assert result["status"] == "succeeded" and result["images"][0]["width"] == 48
    assert result["metadata"] == {"ticket": 7}
    status = subprocess.run([sys.executable, "-m", "diffqueue.cli", "status", "cli-job-1"], env=env,
                            capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == result


def test_cancel_before_generation_ends_canceled_with_a_webhook(worker, redis_server, httpserver, webhook_secret):
    httpserver.expect_request("/hooks/cancel").respond_with_data("ok")
    client = Client(QueueSettings(broker_url=redis_server.url, queue=worker.queue))
    job_id = f"cancel-{uuid.uuid4().hex[:8]}"
    client.cancel(job_id)  # asked before any worker could start it: no race with generation
    client.submit(GenerationRequest(prompt="never drawn", callback_url=httpserver.url_for("/hooks/cancel")),
                  job_id=job_id)
    result = client.wait(job_id, timeout=60)
    assert result.status.value == "canceled" and not result.images
    assert wait_for(lambda: [b for b in webhook_bodies(httpserver, webhook_secret)
                             if b["type"] == "job.canceled" and b["data"]["id"] == job_id])
    client.close()
