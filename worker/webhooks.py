"""Standard Webhooks delivery through a Redis outbox that survives worker restarts.

`enqueue` stores the event (its exact body and a `webhook-id` derived from job id and event type, so
it is stable across retries and re-runs) and marks it due. A delivery thread claims due events under
a lease, signs each attempt with the `standardwebhooks` package and POSTs it. Failures are retried
with exponential backoff and jitter until the horizon; events that exhaust it, or get 410, land in a
dead-letter list that `diffqueue webhooks replay` resends. Nothing here runs on the GPU thread.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import httpx
import redis
from diffqueue.producer.connection import RedisKeys
from diffqueue.producer.models import JobResult, WebhookEventType, WebhookPayload
from pydantic import BaseModel
from standardwebhooks import Webhook

from .url_guard import UnsafeURL, check_url

log = logging.getLogger(__name__)

STARTED_HORIZON_S = 60.0  # job.started is informational: retried briefly, never dead-lettered
LEASE_S = 60.0  # a claimed delivery becomes due again if its worker dies mid-attempt

# Claim up to ARGV[2] due deliveries by pushing their due time past the lease, atomically.
CLAIM_SCRIPT = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return ids
"""


# Enqueue a delivery once per (job, event), however often the job is re-delivered: KEYS marker, item, due.
ENQUEUE_ONCE_SCRIPT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
  return 1
end
return 0
"""


class Delivery(BaseModel):
    id: str
    url: str
    event_type: WebhookEventType
    body: str
    created_at: float
    deadline: float
    attempts: int = 0
    last_error: str | None = None

    @property
    def terminal(self) -> bool:
        return self.event_type != "job.started"


def webhook_id(job_id: str, event_type: str) -> str:
    # Standard Webhooks ids must not contain "."; derive one that is stable for (job, event).
    return "msg_" + hashlib.sha256(f"{job_id}\n{event_type}".encode()).hexdigest()[:32]


def build_body(event_type: WebhookEventType, result: JobResult) -> str:
    timestamp = datetime.now(timezone.utc).isoformat()
    return WebhookPayload(type=event_type, timestamp=timestamp, data=result).model_dump_json()


def retry_delay(attempts: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    delay = min(max_s, base_s * 2 ** max(attempts - 1, 0))
    return delay / 2 + random.uniform(0, delay / 2)


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    parsed = email.utils.parsedate_to_datetime(value)
    return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class WebhookOutbox:
    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        secret: str | None,
        timeout_s: float = 15.0,
        horizon_s: float = 3600.0,
        base_s: float = 5.0,
        max_s: float = 600.0,
        allow_private: bool = False,
        allow_hosts: tuple[str, ...] = (),
        lease_s: float = LEASE_S,
        enqueued_ttl_s: int = 7 * 24 * 3600,
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.redis = client
        self.lease_s = lease_s
        self.enqueued_ttl_s = enqueued_ttl_s
        self.observe = observe or (lambda event, result, seconds: None)
        self.keys = keys
        self.signer = Webhook(secret) if secret else None  # None: can list and replay, not deliver
        self.timeout_s = timeout_s
        self.horizon_s = horizon_s
        self.base_s = base_s
        self.max_s = max_s
        self.allow_private = allow_private
        self.allow_hosts = allow_hosts
        self._claim = self.redis.register_script(CLAIM_SCRIPT)
        self._enqueue_once = self.redis.register_script(ENQUEUE_ONCE_SCRIPT)
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=False)

    def enqueue(self, url: str, event_type: WebhookEventType, result: JobResult) -> bool:
        """Queue the event for delivery, once per (job, event): a re-delivered job may call this again, and
        gets False. Returns whether this call queued it."""
        now = time.time()
        horizon = self.horizon_s if event_type != "job.started" else STARTED_HORIZON_S
        delivery = Delivery(
            id=webhook_id(result.id, event_type), url=url, event_type=event_type,
            body=build_body(event_type, result), created_at=now, deadline=now + horizon,
        )
        keys = [self.keys.webhook_enqueued(delivery.id), self.keys.webhook(delivery.id), self.keys.webhook_due]
        return bool(self._enqueue_once(keys=keys, args=[self.enqueued_ttl_s, delivery.model_dump_json(), now,
                                                        delivery.id]))

    def _save(self, delivery: Delivery, due: float) -> None:
        pipe = self.redis.pipeline()
        pipe.set(self.keys.webhook(delivery.id), delivery.model_dump_json())
        pipe.zadd(self.keys.webhook_due, {delivery.id: due})
        pipe.execute()

    def _drop(self, delivery_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.zrem(self.keys.webhook_due, delivery_id)
        pipe.delete(self.keys.webhook(delivery_id))
        pipe.execute()

    def claim_due(self, limit: int = 32) -> list[str]:
        now = time.time()
        ids = self._claim(keys=[self.keys.webhook_due], args=[now, limit, now + self.lease_s])
        return [i.decode() for i in ids]

    def deliver(self, delivery_id: str) -> None:
        raw = self.redis.get(self.keys.webhook(delivery_id))
        if raw is None:
            self.redis.zrem(self.keys.webhook_due, delivery_id)
            return
        delivery = Delivery.model_validate_json(raw)
        delivery.attempts += 1
        started = time.perf_counter()
        try:
            check_url(delivery.url, self.allow_private, self.allow_hosts)
            response = self._post(delivery)
        except UnsafeURL as error:
            return self._dead(delivery, f"refused: {error}")
        except httpx.HTTPError as error:
            self.observe(delivery.event_type, "error", time.perf_counter() - started)
            return self._retry(delivery, f"{type(error).__name__}: {error}", None)
        self.observe(delivery.event_type, str(response.status_code), time.perf_counter() - started)
        if response.is_success:
            log.info("webhook %s %s delivered after %d attempt(s)", delivery.event_type, delivery.id,
                     delivery.attempts)
            return self._drop(delivery.id)
        if response.status_code == 410:
            return self._dead(delivery, "receiver answered 410 Gone")
        self._retry(delivery, f"HTTP {response.status_code}", retry_after_seconds(response))

    def _post(self, delivery: Delivery) -> httpx.Response:
        if self.signer is None:
            raise RuntimeError("no webhook secret configured")
        now = datetime.now(timezone.utc)
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.signer.sign(delivery.id, now, delivery.body),
            "user-agent": "diffqueue-webhooks",
        }
        return self._http.post(delivery.url, content=delivery.body.encode(), headers=headers)

    def _retry(self, delivery: Delivery, error: str, retry_after: float | None) -> None:
        delivery.last_error = error
        delay = retry_after if retry_after is not None else retry_delay(delivery.attempts, self.base_s, self.max_s)
        due = time.time() + delay
        if due > delivery.deadline:
            if delivery.terminal:
                return self._dead(delivery, f"gave up after {delivery.attempts} attempts: {error}")
            return self._drop(delivery.id)
        log.warning("webhook %s %s attempt %d failed (%s); next in %.1fs", delivery.event_type, delivery.id,
                    delivery.attempts, error, delay)
        self._save(delivery, due=due)

    def _dead(self, delivery: Delivery, reason: str) -> None:
        delivery.last_error = reason
        log.error("webhook %s %s dead-lettered: %s", delivery.event_type, delivery.id, reason)
        pipe = self.redis.pipeline()
        pipe.rpush(self.keys.webhook_dead, delivery.model_dump_json())
        pipe.zrem(self.keys.webhook_due, delivery.id)
        pipe.delete(self.keys.webhook(delivery.id))
        pipe.execute()

    def dead(self) -> list[Delivery]:
        return [Delivery.model_validate_json(raw) for raw in self.redis.lrange(self.keys.webhook_dead, 0, -1)]

    def replay(self) -> int:
        """Move every dead-lettered event back to the outbox with a fresh horizon."""
        count = 0
        while (raw := self.redis.lpop(self.keys.webhook_dead)) is not None:
            delivery = Delivery.model_validate_json(raw)
            now = time.time()
            delivery.attempts, delivery.deadline = 0, now + self.horizon_s
            self._save(delivery, due=now)
            count += 1
        return count


class WebhookDispatcher:
    """The background thread that drains the outbox; several workers may share one outbox."""

    def __init__(self, outbox: WebhookOutbox, poll_s: float = 0.5, parallel: int = 8) -> None:
        self.outbox = outbox
        self.poll_s = poll_s
        self._pool = ThreadPoolExecutor(parallel, thread_name_prefix="diffqueue-webhook")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="diffqueue-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ids = self.outbox.claim_due()
                list(self._pool.map(self.outbox.deliver, ids))
            except redis.RedisError as error:
                log.warning("webhook outbox unavailable: %s", error)
                ids = []
            except Exception:
                log.exception("webhook delivery failed unexpectedly")
                ids = []
            if not ids:
                self._stop.wait(self.poll_s)
