"""The client SDK backend services use: submit, status, wait, cancel, pending.

It needs only Celery, Redis and pydantic. Anything it does can also be done with a plain Celery
`send_task(TASK_NAME, kwargs={"request": {...}}, task_id=job_id, queue="diffqueue")`.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from celery import states

from .connection import RedisKeys, create_celery_app, redis_client
from .models import TASK_NAME, GenerationRequest, JobResult, JobState
from .settings import QueueSettings

# Celery keeps up to 4 priority lists per queue on Redis: the bare name and name + sep + step.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)

# How the worker records non-terminal states in the result backend (terminal ones are SUCCESS).
QUEUED_STATE = "QUEUED"
RUNNING_STATE = "RUNNING"


class JobNotFound(LookupError):
    pass


class JobTimeout(TimeoutError):
    pass


def queue_list_names(queue: str) -> list[str]:
    """The Redis lists Celery's transport uses for `queue`, highest priority first."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


class Client:
    def __init__(self, settings: QueueSettings | None = None, **overrides: Any) -> None:
        self.settings = settings or QueueSettings(**overrides)
        self.app = create_celery_app(self.settings, main="diffqueue-producer")
        self.redis = redis_client(self.settings.broker_url, self.settings.redis_retry_horizon_s)
        self.keys = RedisKeys(self.settings.key_prefix)

    def submit(
        self,
        request: GenerationRequest | dict[str, Any],
        job_id: str | None = None,
        priority: int | None = None,
        ttl_s: float | None = None,
    ) -> str:
        """Enqueue a job and return its id. Submitting an id that exists returns it unchanged.

        `priority`: Celery's, and on Redis 0 is the highest. `ttl_s`: sets `expires_at` to now + ttl_s."""
        if not isinstance(request, GenerationRequest):
            request = GenerationRequest.model_validate(request)
        if ttl_s is not None:
            request = request.model_copy(update={"expires_at": datetime.now(timezone.utc) + timedelta(seconds=ttl_s)})
        job_id = job_id or str(uuid.uuid4())
        marker = self.keys.submitted(job_id)
        payload = request.model_dump(mode="json", exclude_defaults=True)
        if not self.redis.set(marker, "1", nx=True, ex=self.settings.result_ttl_s):
            return job_id
        try:
            self.app.send_task(
                TASK_NAME,
                kwargs={"request": payload},
                task_id=job_id,
                queue=self.settings.queue,
                priority=priority,
            )
        except Exception:
            self.redis.delete(marker)
            raise
        return job_id

    def status(self, job_id: str) -> JobResult:
        """The job's current result; `queued` until a worker picks it up."""
        meta = self.app.backend.get_task_meta(job_id)
        if meta["status"] == states.PENDING:
            if self.redis.exists(self.keys.submitted(job_id)):
                return JobResult(id=job_id, status=JobState.queued)
            raise JobNotFound(job_id)
        return JobResult.model_validate(meta["result"])

    def wait(self, job_id: str, timeout: float = 600.0, poll_interval: float = 0.2) -> JobResult:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self.status(job_id)
            except JobNotFound:
                result = None
            if result is not None and result.status.is_terminal:
                return result
            if time.monotonic() > deadline:
                raise JobTimeout(f"job {job_id} not finished after {timeout}s")
            time.sleep(poll_interval)

    def cancel(self, job_id: str) -> None:
        """Ask for cancellation. A job not yet generating ends `canceled` with a `job.canceled` webhook."""
        self.redis.set(self.keys.cancel(job_id), "1", ex=self.settings.result_ttl_s)

    def pending(self) -> int:
        """Jobs waiting in the queue: the number KEDA's Redis list scaler reads."""
        return sum(self.redis.llen(name) for name in queue_list_names(self.settings.queue))

    def close(self) -> None:
        self.redis.close()
        self.app.close()
