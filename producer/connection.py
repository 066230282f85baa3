"""The Celery app both sides share: JSON only, one task name, one queue."""

from __future__ import annotations

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .models import TASK_NAME
from .settings import QueueSettings

RETRY_BASE_S = 0.1
RETRY_CAP_S = 2.0  # a restarted Redis is noticed within this long


def retries_within(horizon_s: float) -> int:
    """How many retries, backing off from RETRY_BASE_S up to RETRY_CAP_S, it takes to wait horizon_s."""
    backoff, waited, retries = ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S), 0.0, 0
    while waited < horizon_s:
        retries += 1
        waited += backoff.compute(retries)
    return retries


def redis_client(url: str, retry_horizon_s: float) -> redis.Redis:
    """A client that rides out a Redis restart: connection errors are retried for about retry_horizon_s."""
    retry = Retry(ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S), retries_within(retry_horizon_s))
    return redis.Redis.from_url(url, retry=retry)


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
        **_retry_through_outages(settings.redis_retry_horizon_s),
    )
    return app


def _retry_through_outages(horizon_s: float) -> dict:
    """Celery's own retry settings, so that publishing and result reads and writes wait out a Redis restart
    (for at least horizon_s) instead of failing the job."""
    retries = retries_within(horizon_s)
    policy = {"max_retries": retries, "interval_start": 0, "interval_step": RETRY_BASE_S * 5,
              "interval_max": RETRY_CAP_S}
    return {
        "task_publish_retry_policy": policy,
        "result_backend_transport_options": {"retry_policy": policy},
        "result_backend_always_retry": True,
        "result_backend_max_retries": retries,
        "result_backend_base_sleep_between_retries_ms": int(RETRY_BASE_S * 1000),
        "result_backend_max_sleep_between_retries_ms": int(RETRY_CAP_S * 1000),
    }


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

    def webhook_enqueued(self, delivery_id: str) -> str:
        return f"{self.prefix}:webhooks:enqueued:{delivery_id}"

    @property
    def webhook_dead(self) -> str:
        return f"{self.prefix}:webhooks:dead"
