from __future__ import annotations

import os
from pathlib import Path

# Nothing is downloaded at test time: set before anything imports huggingface_hub (it reads this once).
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from diffqueue.local_redis import LocalRedis
from tests.helpers import WorkerProcess, new_webhook_secret, plain_celery

# Each alias: (family, default steps, default guidance, default size). Small enough for CPU tests.
TINY_MODELS = {
    "sd": ("sd", 4, 5.0, 64),
    "sd2": ("sd2", 4, 5.0, 64),
    "sd-turbo": ("sd-turbo", 2, 0.0, 64),
    "sdxl": ("sdxl", 3, 5.0, 64),
    "sdxl-turbo": ("sdxl-turbo", 2, 0.0, 64),
    "zimage": ("zimage", 3, 0.0, 64),
}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with LocalRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    from diffqueue.worker.tiny_models import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {alias: write_tiny_model(root / alias, family) for alias, (family, *_rest) in TINY_MODELS.items()}


@pytest.fixture(scope="session")
def tiny_lora(tiny_model_dirs, tmp_path_factory) -> Path:
    from diffqueue.worker.tiny_models import write_tiny_lora

    return write_tiny_lora(tmp_path_factory.mktemp("loras") / "style.safetensors", tiny_model_dirs["sd"])


@pytest.fixture(scope="session")
def models_file(tiny_model_dirs, tiny_lora, tmp_path_factory) -> Path:
    lines = ['default = "sd"', "", "[loras.style]", f'source = "{tiny_lora}"', ""]
    for alias, (_family, steps, guidance, side) in TINY_MODELS.items():
        lines += [
            f'[models."{alias}"]',
            f'source = "{tiny_model_dirs[alias]}"',
            'dtype = "float32"',
            f"defaults = {{ num_inference_steps = {steps}, guidance_scale = {guidance}, width = {side}, "
            f"height = {side} }}",
            "limits = { max_pixels = 16384, max_steps = 50, max_images = 4 }",
            "",
        ]
    path = tmp_path_factory.mktemp("config") / "models.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="session")
def webhook_secret() -> str:
    return new_webhook_secret()


@pytest.fixture(scope="session")
def celery_sender(redis_server):
    app = plain_celery(redis_server.url)
    yield app
    app.close()


@pytest.fixture(scope="module")
def worker(redis_server, models_file, webhook_secret, tmp_path_factory):
    """A real worker that takes jobs one batch at a time without waiting for batches to fill."""
    process = WorkerProcess(redis_server.url, models_file, tmp_path_factory.mktemp("images"), webhook_secret)
    yield process.start()
    process.stop()


@pytest.fixture(scope="module")
def batching_worker(redis_server, models_file, webhook_secret, tmp_path_factory):
    """A worker that waits up to 3 s for a batch to fill, so that jobs sent together batch together."""
    process = WorkerProcess(
        redis_server.url, models_file, tmp_path_factory.mktemp("images"), webhook_secret,
        DIFFQUEUE_MAX_WAIT_MS="3000", DIFFQUEUE_MAX_BATCH="16", DIFFQUEUE_CONCURRENCY="32",
    )
    yield process.start()
    process.stop()


@pytest.fixture(scope="session")
def stock_pipelines(tiny_model_dirs):
    """The stock diffusers pipelines: the oracle every image is compared with."""
    from diffusers import DiffusionPipeline

    cache = {}

    def load(alias: str):
        if alias not in cache:
            pipe = DiffusionPipeline.from_pretrained(tiny_model_dirs[alias], use_safetensors=True,
                                                     local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            cache[alias] = pipe
        return cache[alias]

    return load


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    from tests.helpers import Azurite

    server = Azurite(tmp_path_factory.mktemp("azurite")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def no_worker_outlives_the_session():
    yield
    for process in WorkerProcess.launched:
        process.kill()
