"""The worker's Celery app and the `diffqueue.generate` task."""

from __future__ import annotations

import logging

import redis
from celery import Celery
from celery.exceptions import BackendError, Reject
from celery.signals import worker_shutting_down
from celery.worker.consumer import Consumer
from diffqueue.producer.connection import create_celery_app
from diffqueue.producer.models import TASK_NAME, ErrorInfo, JobResult, JobState
from kombu.exceptions import OperationalError

from .results import ResultStore
from .runtime import WorkerRuntime
from .settings import WorkerSettings

log = logging.getLogger(__name__)

# Redis still unreachable after the retry horizon (DIFFQUEUE_REDIS_RETRY_HORIZON_S).
REDIS_UNAVAILABLE = (redis.RedisError, BackendError, OperationalError)


def create_worker_app(settings: WorkerSettings) -> Celery:
    app = create_celery_app(settings, main="diffqueue-worker")
    app.conf.update(
        task_acks_late=True,  # a job is acknowledged only once its result is recorded
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_concurrency=settings.celery_concurrency,
        worker_consumer=f"{__name__}:RecordingConsumer",
        broker_transport="diffqueue.worker.broker:Transport",  # survives a Redis restart (see broker.py)
        broker_transport_options={**app.conf.broker_transport_options,
                                  "retry_horizon_s": settings.redis_retry_horizon_s},
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


def register_generate_task(app: Celery, runtime: WorkerRuntime) -> None:
    # weak=False: the receiver is a closure and must outlive this function.
    worker_shutting_down.connect(lambda **_: runtime.drain(), weak=False)

    @app.task(name=TASK_NAME, bind=True, ignore_result=True)
    def generate(self, *args, **kwargs) -> dict:
        # Any args are accepted here so that a malformed message still ends in a recorded failure.
        priority = (self.request.delivery_info or {}).get("priority") or 0
        try:
            return runtime.handle(self.request.id, args, kwargs, priority)
        except REDIS_UNAVAILABLE as error:
            # A plain exception would make Celery ack (and so lose) the job. Requeue it; if Redis is too far
            # gone even for that, the unacknowledged message comes back when its lease lapses.
            log.error("job %s: Redis unavailable (%s); returning it to the queue", self.request.id, error)
            raise Reject(f"redis unavailable: {error}", requeue=True) from error


class RecordingConsumer(Consumer):
    """Celery's consumer, except that a message it cannot decode still gets a failed result."""

    def on_decode_error(self, message, exc) -> None:
        self._record_failure(message, f"the message could not be decoded: {exc}")
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body, message, exc) -> None:
        self._record_failure(message, f"the message is not a valid task: {exc}")
        super().on_invalid_task(body, message, exc)

    def _record_failure(self, message, reason: str) -> None:
        job_id = (message.headers or {}).get("id")
        if not job_id:
            return
        error = ErrorInfo(code="invalid_message", message=reason, field="request")
        try:
            ResultStore(self.app).record(JobResult(id=str(job_id), status=JobState.failed, error=error))
        except Exception:
            log.exception("could not record the failure of undecodable message %s", job_id)
