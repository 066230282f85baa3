"""Real parts for the tests: a worker subprocess, a plain Celery sender, image helpers."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from celery import Celery
from PIL import Image

TASK = "diffqueue.generate"


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def plain_celery(redis_url: str) -> Celery:
    """What a backend service that never installs `producer` would write."""
    app = Celery("plain-sender", broker=redis_url, backend=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    return app


class WorkerProcess:
    """`diffqueue worker` in a subprocess, on its own queue, stopped with SIGTERM like a container."""

    launched: list["WorkerProcess"] = []  # every worker of the session, killed at its end whatever happened

    def __init__(self, redis_url: str, models_file: Path, storage_dir: Path, secret: str,
                 queue: str | None = None, **env: str) -> None:
        self.queue = queue or f"test-{uuid.uuid4().hex[:8]}"
        self.redis_url = redis_url
        self.log_path = storage_dir.parent / f"worker-{self.queue}-{uuid.uuid4().hex[:6]}.log"
        self.env = {
            **os.environ,
            "DIFFQUEUE_BROKER_URL": redis_url,
            "DIFFQUEUE_QUEUE": self.queue,
            "DIFFQUEUE_MODELS_FILE": str(models_file),
            "DIFFQUEUE_STORAGE_URL": storage_dir.as_uri(),
            "DIFFQUEUE_WEBHOOK_SECRET": secret,
            "DIFFQUEUE_ALLOW_PRIVATE_CALLBACKS": "1",
            "DIFFQUEUE_WEBHOOK_RETRY_BASE_S": "0.2",
            "DIFFQUEUE_WEBHOOK_POLL_S": "0.1",
            "DIFFQUEUE_DEVICE": "cpu",
            **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "WorkerProcess":
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> "WorkerProcess":
        """Start the process without waiting for it to take jobs."""
        with open(self.log_path, "ab") as log:
            # Its own session, so that a signal to its process group never reaches pytest.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "diffqueue.cli", "worker", "--loglevel", "INFO"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        WorkerProcess.launched.append(self)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait_ready(self, timeout: float) -> None:
        app = plain_celery(self.redis_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            # Ping this very worker: others on the same broker would answer a broadcast.
            if app.control.ping(destination=[self.hostname], timeout=0.5):
                return
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log_tail()}")

    @property
    def hostname(self) -> str:
        import socket

        return f"diffqueue-{self.process.pid}@{socket.gethostname()}"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def send(self, app: Celery, request: dict | None = None, job_id: str | None = None, **options) -> str:
        job_id = job_id or str(uuid.uuid4())
        kwargs = options.pop("kwargs", {"request": request})
        app.send_task(TASK, kwargs=kwargs, task_id=job_id, queue=self.queue, **options)
        return job_id


def wait_result(app: Celery, job_id: str, timeout: float = 120.0) -> dict:
    """The terminal result as the Celery result backend holds it."""
    return app.AsyncResult(job_id).get(timeout=timeout)


def read_image(url: str) -> tuple[bytes, np.ndarray]:
    data = Path(urlparse(url).path).read_bytes()
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def max_pixel_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def webhook_bodies(httpserver, secret: str) -> list[dict]:
    """Every webhook the receiver got, each verified with the `standardwebhooks` package."""
    from standardwebhooks import Webhook

    verifier = Webhook(secret)
    bodies = []
    for request, _response in list(httpserver.log):
        headers = {k.lower(): v for k, v in request.headers.items()}
        verifier.verify(request.get_data(), headers)  # raises on a bad signature
        bodies.append({"headers": headers, **json.loads(request.get_data())})
    return bodies


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Azurite:
    """Microsoft's Blob Storage emulator (npm `azurite`), on loopback, stoppable mid-test."""

    def __init__(self, directory: Path) -> None:
        import shutil

        from diffqueue.local_redis import free_port

        local = Path(__file__).resolve().parent.parent / ".tools/node_modules/.bin/azurite-blob"
        self.binary = str(local) if local.exists() else shutil.which("azurite-blob")
        if self.binary is None:
            raise RuntimeError("azurite-blob not found: `make test` installs it into .tools/ with npm")
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
                f"BlobEndpoint=http://127.0.0.1:{self.port}/devstoreaccount1;")

    def start(self) -> "Azurite":
        import socket

        self.process = subprocess.Popen(
            [self.binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location",
             str(self.directory), "--silent", "--skipApiVersionCheck", "--loose"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _port_open(socket, self.port), timeout=30)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # busy Azurite can ignore SIGTERM for a while
                self.process.kill()
                self.process.wait()


def _port_open(socket, port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False
