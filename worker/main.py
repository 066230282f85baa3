"""`diffqueue worker`: warm the models, then consume the queue with a Celery threads pool."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket

from .app import create_worker_app, register_generate_task
from .runtime import WorkerRuntime
from .settings import WorkerSettings

log = logging.getLogger(__name__)


def run_worker(settings: WorkerSettings, loglevel: str = "INFO") -> int:
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every request at INFO
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints every thread's stack
    app = create_worker_app(settings)
    runtime = WorkerRuntime.create(settings, app)
    runtime.start()
    register_generate_task(app, runtime)
    log.info("worker ready: queue=%s device=%s max_batch=%d models=%s", settings.queue,
             runtime.registry.device, settings.max_batch, ", ".join(runtime.registry.models_file.models))
    worker = app.Worker(
        queues=[settings.queue],
        loglevel=loglevel,
        hostname=worker_hostname(),
        without_mingle=True,
        without_gossip=True,
        quiet=logging.getLevelName(loglevel) > logging.INFO,
    )
    try:
        worker.start()
    finally:
        runtime.stop()
    return worker.exitcode or 0


def worker_hostname() -> str:
    """Unique per process, so that Celery control commands can address one worker."""
    return f"diffqueue-{os.getpid()}@{socket.gethostname()}"
