"""Job results in the Celery result backend: non-terminal states, then exactly one terminal result."""

from __future__ import annotations

from celery import Celery, states
from diffqueue.producer.client import QUEUED_STATE, RUNNING_STATE
from diffqueue.producer.models import JobResult, JobState

CELERY_STATES = {JobState.queued: QUEUED_STATE, JobState.running: RUNNING_STATE}


class ResultStore:
    def __init__(self, app: Celery) -> None:
        self.backend = app.backend

    def terminal(self, job_id: str) -> JobResult | None:
        """The job's terminal result if it has one: a redelivered job returns it instead of running again."""
        meta = self.backend.get_task_meta(job_id)
        if meta.get("status") != states.SUCCESS:
            return None
        result = JobResult.model_validate(meta["result"])
        return result if result.status.is_terminal else None

    def record(self, result: JobResult) -> None:
        # Terminal results are Celery SUCCESS, so AsyncResult(job_id).get() works for plain Celery clients.
        state = states.SUCCESS if result.status.is_terminal else CELERY_STATES[result.status]
        self.backend.store_result(result.id, result.model_dump(mode="json"), state)
