"""Leases on held jobs: a short visibility timeout that the live worker keeps renewing.

Celery's Redis transport records each delivered, unacknowledged message in the sorted set
`unacked_index` with its delivery time, and any consuming worker re-queues messages older than
`visibility_timeout`. The default (one hour) makes a killed worker's jobs wait an hour and re-runs jobs
that run longer than that. diffqueue sets a short timeout (60 s) and, every few seconds, moves the
delivery time of every message this worker still holds (running or waiting for the GPU) to now. A live
worker's jobs are therefore never re-delivered; a SIGKILLed worker's jobs return once its lease lapses.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery.worker import state

log = logging.getLogger(__name__)


def held_delivery_tags() -> list[str]:
    """Delivery tags of every message this worker process has taken and not yet acknowledged."""
    return [request.message.delivery_tag for request in list(state.reserved_requests)]


class LeaseRenewer:
    def __init__(self, client: redis.Redis, unacked_index_key: str, visibility_timeout_s: float) -> None:
        self.client = client
        self.key = unacked_index_key
        self.interval_s = max(1.0, visibility_timeout_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="diffqueue-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def renew(self) -> int:
        tags = held_delivery_tags()
        if tags:
            now = time.time()
            # XX: only messages still unacknowledged; an ack racing with us must not be undone.
            self.client.zadd(self.key, {tag: now for tag in tags}, xx=True)
        return len(tags)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except redis.RedisError as error:
                log.warning("could not renew job leases: %s", error)
