"""The Celery app both sides share: JSON only, one task name, one queue."""

from __future__ import annotations

from celery import Celery

from .models import TASK_NAME
from .settings import QueueSettings


def create_celery_app(settings: QueueSettings, main: str = "diffqueue") -> Celery:
    app = Celery(main, broker=settings.broker_url, backend=settings.result_backend_url)
    app.conf.update(
        # Pickle is never accepted, in either direction.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
        result_expires=settings.result_ttl_s,
        broker_connection_retry_on_startup=True,
        enable_utc=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,  # scan on every interval, not every tenth
        },
    )
    return app


class RedisKeys:
    """diffqueue's own Redis keys, beside Celery's. One place so that they never drift apart."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def submitted(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def deliveries(self, job_id: str) -> str:
        return f"{self.prefix}:deliveries:{job_id}"

    @property
    def webhook_due(self) -> str:
        return f"{self.prefix}:webhooks:due"

    def webhook(self, delivery_id: str) -> str:
        return f"{self.prefix}:webhooks:item:{delivery_id}"

    @property
    def webhook_dead(self) -> str:
        return f"{self.prefix}:webhooks:dead"
