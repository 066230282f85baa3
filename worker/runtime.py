"""What a Celery thread does with one job: validate, batch, upload, record, notify."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import redis
import tenacity
import torch
from celery import Celery
from celery.exceptions import Reject
from diffqueue.producer.connection import RedisKeys, redis_client
from diffqueue.producer.models import ErrorInfo, ImageInfo, JobResult, JobState, Timings, WebhookEventType

from .batcher import Batcher, BatchOutcome, JobCanceled, JobExpired, JobReturned
from .generation import BatchRunner
from .images import CONTENT_TYPES, EXTENSIONS, encode_image
from .inputs import fetch_image
from .jobs import Job, JobError, parse_request, raw_field, resolve_job
from .lease import LeaseRenewer
from .metrics import HealthServer, Metrics, gauge
from .registry import ModelRegistry, ModelsFile
from .results import ResultStore
from .settings import WorkerSettings
from .storage import ImageStore, StorageError, blob_name, storage_from_settings
from .url_guard import UnsafeURL, check_url
from .webhooks import WebhookDispatcher, WebhookOutbox

log = logging.getLogger(__name__)

TERMINAL_EVENTS: dict[JobState, WebhookEventType] = {
    JobState.succeeded: "job.succeeded",
    JobState.failed: "job.failed",
    JobState.canceled: "job.canceled",
}


def cancel_requested(client: redis.Redis, keys: RedisKeys, job_id: str) -> bool:
    try:
        return bool(client.exists(keys.cancel(job_id)))
    except redis.RedisError as error:
        log.warning("could not check whether job %s was canceled (%s); running it", job_id, error)
        return False


@dataclass
class WorkerRuntime:
    settings: WorkerSettings
    registry: ModelRegistry
    batcher: Batcher
    store: ImageStore
    results: ResultStore
    outbox: WebhookOutbox | None
    dispatcher: WebhookDispatcher | None
    redis: redis.Redis
    keys: RedisKeys
    metrics: Metrics
    lease: LeaseRenewer
    health: HealthServer | None = None
    ready: bool = False

    @classmethod
    def create(cls, settings: WorkerSettings, app: Celery) -> "WorkerRuntime":
        client = redis_client(settings.broker_url, settings.redis_retry_horizon_s)
        # The GPU thread must not wait out a Redis outage for a cancel check: one try, then assume not canceled.
        quick_client = redis_client(settings.broker_url, retry_horizon_s=0)
        keys = RedisKeys(settings.key_prefix)
        metrics = Metrics()
        device = settings.resolved_device()
        registry = ModelRegistry(ModelsFile.load(settings.models_file), device,
                                 settings.memory_budget_bytes(device), settings.hf_cache_dir)
        outbox = dispatcher = None
        if settings.webhook_secret is not None:
            outbox = WebhookOutbox(
                client, keys, settings.webhook_secret.get_secret_value(),
                timeout_s=settings.webhook_timeout_s, horizon_s=settings.webhook_retry_horizon_s,
                base_s=settings.webhook_retry_base_s, max_s=settings.webhook_retry_max_s,
                allow_private=settings.allow_private_urls, allow_hosts=tuple(settings.url_allow_list),
                lease_s=settings.webhook_lease_s, enqueued_ttl_s=settings.result_ttl_s,
                observe=lambda event, result, seconds: metrics.webhook.labels(event, result).observe(seconds),
            )
            dispatcher = WebhookDispatcher(outbox, poll_s=settings.webhook_poll_s)
        batcher = Batcher(
            BatchRunner(registry, metrics, settings.fault_oom_above_batch), settings.max_batch, settings.max_batch_pixels, settings.max_wait_ms,
            is_canceled=lambda job_id: cancel_requested(quick_client, keys, job_id),
            is_resident=registry.is_resident, max_model_wait_s=settings.max_model_wait_s,
        )
        unacked_index = app.conf.broker_transport_options.get("unacked_index_key", "unacked_index")
        lease = LeaseRenewer(client, unacked_index, settings.visibility_timeout_s)
        runtime = cls(settings, registry, batcher, storage_from_settings(settings), ResultStore(app),
                      outbox, dispatcher, client, keys, metrics, lease)
        metrics.add_collector(runtime._gauges)
        if settings.metrics_port is not None:
            runtime.health = HealthServer(settings.metrics_host, settings.metrics_port, metrics,
                                          runtime.is_live, lambda: runtime.ready)
        return runtime

    def start(self) -> None:
        """Fetch, check and load every model before taking jobs, then start the GPU and webhook threads.
        The health server answers from the start; /readyz turns 200 only once models are warm."""
        if self.health:
            self.health.start()
        self.lease.start()
        self.registry.prepare()
        self.registry.warm()
        self.batcher.start()
        if self.dispatcher:
            self.dispatcher.start()
        self.ready = True

    def drain(self) -> None:
        """SIGTERM: stop taking jobs; jobs not yet on the GPU go back to the queue."""
        self.ready = False
        returned = self.batcher.drain()
        log.info("draining: %d job(s) returned to the queue, the batch in flight finishes", returned)

    def stop(self) -> None:
        self.ready = False
        self.lease.stop()
        self.batcher.stop(timeout=60)
        if self.dispatcher:
            self.dispatcher.stop()
        if self.health:
            self.health.stop()

    def is_live(self) -> tuple[bool, str]:
        if not self.ready:
            return True, "starting"
        if not self.batcher.is_alive():
            return False, "the GPU thread has died"
        if self.dispatcher and not self.dispatcher.is_alive():
            return False, "the webhook thread has died"
        busy_since = self.batcher.busy_since
        if busy_since is not None and time.time() - busy_since > self.settings.liveness_max_batch_s:
            return False, f"a batch has been running for {time.time() - busy_since:.0f}s"
        return True, "ok"

    def _gauges(self) -> list:
        from diffqueue.producer.client import queue_list_names

        queued = sum(self.redis.llen(name) for name in queue_list_names(self.settings.queue))
        families = [
            gauge("diffqueue_pending_jobs", "Jobs waiting: in the Redis queue, or held by this worker",
                  labels={"queue": queued, "worker": self.batcher.pending_count}, label_name="where"),
            gauge("diffqueue_ready", "1 once models are warm and the worker takes jobs", float(self.ready)),
            gauge("diffqueue_resident_models", "Pipelines loaded in memory", len(self.registry.resident)),
            gauge("diffqueue_model_load_seconds", "Last load time of each model",
                  labels=dict(self.registry.load_seconds), label_name="model"),
            gauge("diffqueue_model_evictions", "Pipelines evicted to stay under the memory budget",
                  self.registry.evictions),
        ]
        import torch

        if torch.cuda.is_available():
            families.append(gauge("diffqueue_gpu_memory_bytes", "CUDA memory of this process", labels={
                "allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()},
                label_name="kind"))
        return families

    def handle(self, job_id: str, args: tuple, kwargs: dict[str, Any], priority: int = 0) -> dict:
        received_at = time.time()
        callback = self._raw_callback(kwargs)
        existing = self.results.terminal(job_id)
        if existing is not None:
            log.info("job %s already %s; not running it again", job_id, existing.status.value)
            self._notify(callback, existing)  # in case a worker died between recording it and notifying
            return existing.model_dump(mode="json")
        deliveries = self._count_delivery(job_id)
        if deliveries > self.settings.max_deliveries:
            poison = JobResult(id=job_id, status=JobState.failed, metadata=self._raw_metadata(kwargs), error=ErrorInfo(
                code="poison_message", message=f"delivered {deliveries} times without finishing; not retried"))
            return self._finish(poison, callback)
        self._maybe_crash(kwargs)
        try:
            request = parse_request(args, kwargs)
            callback = self._checked_callback(request.callback_url)
            job = resolve_job(job_id, request, self.registry, self._fetch_image, priority)
        except JobError as error:
            failed = JobResult(id=job_id, status=JobState.failed, metadata=self._raw_metadata(kwargs),
                               error=ErrorInfo(code=error.code, message=error.message, field=error.field))
            return self._finish(failed, callback)
        return self._run(job, callback, received_at)

    def _run(self, job: Job, callback: str | None, received_at: float) -> dict:
        running = JobResult(id=job.id, status=JobState.running, model=job.model.alias,
                            revision=job.model.revision, metadata=job.request.metadata)
        if self.redis.exists(self.keys.cancel(job.id)):
            return self._finish(running.model_copy(update={"status": JobState.canceled}), callback)
        if job.expired():
            return self._finish(self._failed(running, "expired", "expires_at passed before the job started"),
                                callback)
        self.results.record(running)
        if callback and self.outbox:
            self.outbox.enqueue(callback, "job.started", running)
        try:
            outcome: BatchOutcome = self.batcher.submit(job).result()
        except JobCanceled:
            return self._finish(running.model_copy(update={"status": JobState.canceled}), callback)
        except JobExpired:
            return self._finish(self._failed(running, "expired", "expires_at passed before the job started"),
                                callback)
        except JobReturned:
            self.results.record(running.model_copy(update={"status": JobState.queued}))
            self.redis.decr(self.keys.deliveries(job.id))  # handed back unstarted: not a failed attempt
            raise Reject("worker draining", requeue=True) from None
        except torch.OutOfMemoryError as error:
            return self._finish(self._failed(running, "out_of_memory", str(error)), callback)
        except Exception as error:
            return self._finish(self._failed(running, "generation_failed", f"{type(error).__name__}: {error}"),
                                callback)
        try:
            images, upload_seconds = self._upload(job, outcome)
        except StorageError as error:
            return self._finish(self._failed(running, "storage_error", str(error)), callback)
        succeeded = running.model_copy(update={
            "status": JobState.succeeded,
            "images": images,
            "batch_size": outcome.batch_size,
            "timings": Timings(queued=outcome.started_at - received_at, generate=outcome.seconds,
                               upload=upload_seconds),
        })
        return self._finish(succeeded, callback)

    def _upload(self, job: Job, outcome: BatchOutcome) -> tuple[list[ImageInfo], float]:
        started = time.time()
        fmt = job.request.output_format
        infos = []
        for index, image in enumerate(outcome.images):
            seed = job.seed + index
            parameters = self._parameters(job, seed) if self.settings.png_parameters else None
            data = encode_image(image, fmt, parameters, self.settings.image_quality)
            metadata = {"job_id": job.id, "seed": str(seed), "model": job.model.alias,
                        "revision": job.model.revision}
            stored = self._put(blob_name(job.id, index, EXTENSIONS[fmt]), data, CONTENT_TYPES[fmt], metadata)
            infos.append(ImageInfo(url=stored.url, url_expires_at=stored.expires_at, seed=seed, width=image.width, height=image.height,
                                   content_type=CONTENT_TYPES[fmt], sha256=hashlib.sha256(data).hexdigest()))
        return infos, time.time() - started

    def _put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]):
        """Upload, retrying through a storage outage for up to storage_retry_horizon_s (the job's lease is
        renewed meanwhile); the blob name is deterministic, so a retry overwrites, never duplicates."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(StorageError),
            wait=tenacity.wait_exponential_jitter(initial=1, max=30),
            stop=tenacity.stop_after_delay(self.settings.storage_retry_horizon_s),
            before_sleep=lambda state: log.warning("upload of %s failed (%s); retrying", name,
                                                   state.outcome.exception()),
            reraise=True,
        )
        return retrying(self.store.put, name, data, content_type, metadata)

    @staticmethod
    def _parameters(job: Job, seed: int) -> dict:
        return {
            "prompt": job.request.prompt, "negative_prompt": job.negative_prompt, "seed": seed,
            "guidance_scale": job.guidance_scale, "num_inference_steps": job.num_inference_steps,
            "width": job.width, "height": job.height, "model": job.model.alias, "revision": job.model.revision,
        }

    @staticmethod
    def _failed(base: JobResult, code: str, message: str) -> JobResult:
        return base.model_copy(update={"status": JobState.failed, "error": ErrorInfo(code=code, message=message)})

    def _finish(self, result: JobResult, callback: str | None) -> dict:
        self.results.record(result)
        self.metrics.jobs.labels(result.status.value, result.error.code if result.error else "").inc()
        if result.timings.queued is not None:
            self.metrics.queue_wait.observe(result.timings.queued)
        if result.timings.upload is not None:
            self.metrics.upload.observe(result.timings.upload)
        self._notify(callback, result)
        log.info("job %s %s%s", result.id, result.status.value,
                 f" ({result.error.code}: {result.error.message})" if result.error else "")
        return result.model_dump(mode="json")

    def _notify(self, callback: str | None, result: JobResult) -> None:
        if callback and self.outbox:
            self.outbox.enqueue(callback, TERMINAL_EVENTS[result.status], result)

    def _maybe_crash(self, kwargs: dict[str, Any]) -> None:
        """Fault injection for the poison-message test: die like a native crash would, no cleanup."""
        prompt = raw_field(kwargs, "prompt")
        if self.settings.fault_crash_on_prompt is not None and prompt == self.settings.fault_crash_on_prompt:
            log.error("fault injection: crashing on prompt %r", prompt)
            os._exit(70)

    def _count_delivery(self, job_id: str) -> int:
        key = self.keys.deliveries(job_id)
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, self.settings.result_ttl_s)
        return pipe.execute()[0]

    def _fetch_image(self, url: str, field: str):
        return fetch_image(url, field, self.settings.max_input_bytes, self.settings.allow_private_urls,
                           tuple(self.settings.url_allow_list))

    def _checked_callback(self, url: object) -> str | None:
        if url is None:
            return None
        if self.outbox is None:
            raise JobError("invalid_request", "callback_url: this worker has no DIFFQUEUE_WEBHOOK_SECRET to sign "
                           "webhooks with", "callback_url")
        try:
            check_url(str(url), self.settings.allow_private_urls, tuple(self.settings.url_allow_list))
        except UnsafeURL as error:
            raise JobError("invalid_request", f"callback_url: {error}", "callback_url") from None
        return str(url)

    def _raw_callback(self, kwargs: dict[str, Any]) -> str | None:
        """The callback of a request that may fail validation, if it is usable at all."""
        url = raw_field(kwargs, "callback_url")
        try:
            return self._checked_callback(url) if isinstance(url, str) else None
        except JobError:
            return None

    @staticmethod
    def _raw_metadata(kwargs: dict[str, Any]) -> dict:
        metadata = raw_field(kwargs, "metadata")
        return metadata if isinstance(metadata, dict) else {}
