"""kombu's Redis transport with one fix, used by the worker's Celery app (`broker_transport`).

With Celery 5.7 and kombu 5.7.0, work on a channel whose broker connection is already gone (acking a
task from before a Redis restart, or restoring unacked messages while closing the lost connection)
fails with AttributeError inside `_connparams`. That is not one of kombu's connection errors, so it
escapes every handler and Celery exits the worker. Here the same situation raises redis's
ConnectionError, which kombu and Celery already handle: the worker reconnects, and messages that could
not be acked or restored come back through their lapsed leases.
"""

from __future__ import annotations

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel
