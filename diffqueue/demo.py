"""`make demo`: a private Redis, a tiny model, a real worker process, a handful of jobs, then cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from diffqueue.local_redis import LocalRedis
from diffqueue.producer import Client, GenerationRequest, QueueSettings

MODELS_TOML = """\
default = "tiny-sd"

[models.tiny-sd]
source = "./models/tiny-sd"
dtype = "float32"
defaults = {{ num_inference_steps = 8, guidance_scale = 5.0, width = 64, height = 64 }}
"""


def worker_environment(redis_url: str, workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DIFFQUEUE_BROKER_URL": redis_url,
        "DIFFQUEUE_MODELS_FILE": str(workdir / "models.toml"),
        "DIFFQUEUE_STORAGE_URL": (workdir / "outputs").resolve().as_uri(),
        "DIFFQUEUE_MAX_BATCH": "4",
        "DIFFQUEUE_MAX_WAIT_MS": "300",
        "DIFFQUEUE_DEVICE": "cpu",
    }


def run_demo(workdir: Path, jobs: int = 6) -> int:
    from diffqueue.worker.tiny_models import write_tiny_model

    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[demo] building a tiny random-weight SD pipeline in {workdir / 'models/tiny-sd'}")
    write_tiny_model(workdir / "models/tiny-sd", "sd")
    (workdir / "models.toml").write_text(MODELS_TOML.format())

    with LocalRedis(workdir / "redis") as server:
        print(f"[demo] private redis-server on {server.url}")
        worker = subprocess.Popen(
            [sys.executable, "-m", "diffqueue.cli", "worker", "--loglevel", "WARNING"],
            env=worker_environment(server.url, workdir),
        )
        try:
            return submit_and_report(Client(QueueSettings(broker_url=server.url)), jobs)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            print("[demo] worker stopped; redis stopped")


def submit_and_report(client: Client, jobs: int) -> int:
    scales = [0.0, 1.0, 3.5, 7.5]
    started = time.time()
    ids = [
        client.submit(GenerationRequest(prompt=f"a lighthouse at dusk, variant {i}", seed=1000 + i,
                                        guidance_scale=scales[i % len(scales)],
                                        negative_prompt="blurry" if i % 2 else None,
                                        metadata={"demo_index": i}))
        for i in range(jobs)
    ]
    print(f"[demo] submitted {len(ids)} jobs; waiting for the worker (it loads the model first)")
    failures = 0
    for job_id in ids:
        result = client.wait(job_id, timeout=300)
        if result.status.value != "succeeded":
            failures += 1
            print(f"[demo] {job_id} {result.status.value}: {result.error}")
            continue
        for image in result.images:
            path = urlparse(image.url).path
            print(f"[demo] {path}  seed={image.seed} batch_size={result.batch_size}")
    print(f"[demo] {jobs - failures}/{jobs} jobs succeeded in {time.time() - started:.1f}s")
    return 1 if failures else 0
