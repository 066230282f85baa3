"""Deployment: Dockerfiles lint clean, the Container Apps manifest scales on the list the worker consumes,
KEDA's own query counts pending and in-flight jobs on a real Redis, and metrics/health show real jobs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import redis
import yaml
from diffqueue.producer import Client, GenerationRequest, QueueSettings, queue_list_names

from diffqueue.local_redis import free_port
from tests.helpers import WorkerProcess, wait_for, wait_result

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"

# What KEDA's redis scaler evaluates (pkg/scalers/redis_scaler.go): the key's TYPE picks the count.
KEDA_LENGTH_SCRIPT = """
local kind = redis.call('TYPE', KEYS[1]).ok
local count_by_kind = {list = 'LLEN', hash = 'HLEN', set = 'SCARD', zset = 'ZCARD', none = 'LLEN'}
return redis.call(count_by_kind[kind], KEYS[1])
"""


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load((DOCKER / "containerapp.yaml").read_text())


def container_env(manifest: dict) -> dict[str, str]:
    container = manifest["properties"]["template"]["containers"][0]
    secrets = {s["name"]: s["value"] for s in manifest["properties"]["configuration"]["secrets"]}
    return {e["name"]: e.get("value", secrets.get(e.get("secretRef"))) for e in container["env"]}


def redis_rules(manifest: dict) -> dict[str, dict]:
    return {r["name"]: r["custom"]["metadata"] for r in manifest["properties"]["template"]["scale"]["rules"]
            if r["custom"]["type"] == "redis"}


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("Dockerfile*")))
def test_hadolint_passes(dockerfile):
    result = subprocess.run(["hadolint", str(DOCKER / dockerfile)], capture_output=True, text=True,
                            env={"PATH": str(Path(sys.executable).parent)})
    assert result.returncode == 0, result.stdout + result.stderr


def test_scale_rules_name_the_lists_the_worker_consumes_at_its_database(manifest):
    env = container_env(manifest)
    queue = env.get("DIFFQUEUE_QUEUE", "diffqueue")
    database = urlparse(env["DIFFQUEUE_BROKER_URL"]).path.lstrip("/") or "0"
    rules = redis_rules(manifest)
    queue_rules = [m for name, m in rules.items() if name.startswith("queue-length")]
    assert sorted(m["listName"] for m in queue_rules) == sorted(queue_list_names(queue))
    assert rules["in-flight"]["listName"] == "unacked"  # kombu's hash of delivered, unacknowledged messages
    for metadata in rules.values():
        assert metadata["databaseIndex"] == database
        assert int(metadata["listLength"]) > 0


def test_manifest_scales_to_zero_drains_and_probes_the_health_port(manifest):
    template = manifest["properties"]["template"]
    env = container_env(manifest)
    assert template["scale"]["minReplicas"] == 0
    assert template["terminationGracePeriodSeconds"] >= 300
    probes = {p["type"]: p["httpGet"] for p in template["containers"][0]["probes"]}
    assert probes["Liveness"]["path"] == "/livez" and probes["Readiness"]["path"] == "/readyz"
    assert {p["port"] for p in probes.values()} == {int(env["DIFFQUEUE_METRICS_PORT"])}
    assert manifest["identity"]["type"] == "UserAssigned" and "AZURE_CLIENT_ID" in env


def test_compose_publishes_only_on_loopback():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    ports = [p for service in compose["services"].values() for p in service.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)


def keda_count(client: redis.Redis, list_name: str) -> int:
    return int(client.eval(KEDA_LENGTH_SCRIPT, 1, list_name))


def test_keda_query_counts_pending_then_in_flight_jobs(manifest, redis_server, models_file, webhook_secret,
                                                       tmp_path):
    rules = redis_rules(manifest)
    queue = container_env(manifest).get("DIFFQUEUE_QUEUE", "diffqueue")
    client = redis.Redis.from_url(redis_server.url, db=int(rules["queue-length"]["databaseIndex"]))
    producer = Client(QueueSettings(broker_url=redis_server.url, queue=queue))
    ids = [producer.submit(GenerationRequest(prompt=f"p{i}", seed=i, num_inference_steps=40, width=64, height=64))
           for i in range(6)]
    ids.append(producer.submit(GenerationRequest(prompt="urgent", seed=99), priority=6))

    pending = sum(keda_count(client, rules[name]["listName"]) for name in rules if name.startswith("queue-length"))
    assert pending == 7 == producer.pending()
    cli = subprocess.run([sys.executable, "-m", "diffqueue.cli", "queue"], capture_output=True,
                         text=True, env={"DIFFQUEUE_BROKER_URL": redis_server.url, "DIFFQUEUE_QUEUE": queue})
    assert cli.stdout.strip() == "7"
    assert keda_count(client, rules["in-flight"]["listName"]) == 0

    worker = WorkerProcess(redis_server.url, models_file, tmp_path / "images", webhook_secret, queue=queue,
                           DIFFQUEUE_MAX_BATCH="1", DIFFQUEUE_CONCURRENCY="2").start()
    try:
        # While the worker holds jobs the list shrinks, and the in-flight rule sees what it holds.
        held = wait_for(lambda: keda_count(client, "unacked") or None, timeout=60)
        assert 1 <= held <= 2
        assert keda_count(client, queue) < 6
        for job_id in ids:
            assert producer.wait(job_id, timeout=180).status.value == "succeeded"
        wait_for(lambda: keda_count(client, "unacked") == 0, timeout=30)
        assert producer.pending() == 0
    finally:
        worker.stop()
        producer.close()


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics").text


def metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}(\{{{re.escape(label_text)}\}})? ([0-9.e+-]+)$" if labels else \
        rf"^{re.escape(name)} ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name}{labels} not in metrics"
    return float(match.groups()[-1])


def test_metrics_and_health_after_real_jobs(redis_server, models_file, webhook_secret, tmp_path, celery_sender):
    port = free_port()
    # Launched without waiting: /readyz must answer 503 while models load, then 200.
    worker = WorkerProcess(redis_server.url, models_file, tmp_path / "images", webhook_secret,
                           DIFFQUEUE_METRICS_PORT=str(port)).launch()
    try:
        statuses = []

        def readiness() -> bool:
            try:
                statuses.append(httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code)
            except httpx.HTTPError:
                return False
            return statuses[-1] == 200

        wait_for(readiness, timeout=120, interval=0.02)
        assert statuses[0] == 503, statuses
        worker.wait_ready(60)
        assert httpx.get(f"http://127.0.0.1:{port}/livez").status_code == 200

        ok = [worker.send(celery_sender, {"prompt": f"m{i}", "seed": i}) for i in range(3)]
        bad = worker.send(celery_sender, {"prompt": "m", "width": -8})
        for job_id in [*ok, bad]:
            wait_result(celery_sender, job_id)
        text = scrape(port)
        assert metric(text, "diffqueue_jobs_total", outcome="succeeded", code="") == 3
        assert metric(text, "diffqueue_jobs_total", outcome="failed", code="invalid_request") == 1
        assert metric(text, "diffqueue_batch_size_count") >= 1
        assert metric(text, "diffqueue_generate_seconds_count") >= 1
        assert metric(text, "diffqueue_upload_seconds_count") == 3
        assert metric(text, "diffqueue_queue_wait_seconds_count") == 3
        assert metric(text, "diffqueue_ready") == 1
        assert metric(text, "diffqueue_resident_models") >= 1
        assert metric(text, "diffqueue_model_load_seconds", model="sd") > 0
        assert metric(text, "diffqueue_pending_jobs", where="queue") == 0
    finally:
        assert worker.stop() == 0
