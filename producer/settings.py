"""Settings shared by producers and workers: where the queue lives."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from .models import DEFAULT_QUEUE

# Every network default points at loopback; production sets DIFFQUEUE_BROKER_URL explicitly.
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


class QueueSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFFQUEUE_", extra="ignore")

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str | None = None  # defaults to broker_url
    queue: str = DEFAULT_QUEUE
    key_prefix: str = "diffqueue"  # namespace of diffqueue's own Redis keys
    result_ttl_s: int = 7 * 24 * 3600
    # A held job returns to the queue this long after its worker stops renewing its lease (worker/lease.py).
    visibility_timeout_s: int = 60
    restore_interval_s: int = 10  # how often consuming workers look for lapsed leases
    # Redis commands, publishing and result reads/writes retry connection errors for at least this long.
    redis_retry_horizon_s: float = 120.0

    @property
    def result_backend_url(self) -> str:
        return self.result_backend or self.broker_url
