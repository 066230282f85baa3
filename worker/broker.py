"""kombu's Redis transport, made safe for Redis restarts. The worker's Celery app uses it (`broker_transport`).

Three holes in kombu 5.7.0's transport lose or duplicate jobs when Redis restarts:

1. Work on a channel whose broker connection is already gone (acking a task from before the restart,
   restoring unacked messages while closing the lost connection) fails with AttributeError inside
   `_connparams`. That is not a connection error, so Celery exits the worker. Here it is a ConnectionError,
   which kombu and Celery already handle.
2. A message is popped from the queue (BRPOP) and only then written to the `unacked` hash. If Redis goes
   away between the two, the message exists nowhere but in this process, and kombu drops it. Here the
   write is retried until Redis is back (for up to `retry_horizon_s`) before the message is delivered.
3. Closing a lost connection re-queues every message the channel delivered, including those still
   running in this process, and after a restart any worker re-queues messages whose leases look lapsed
   only because Redis was down. Both make a job run twice. Here a closing channel leaves the messages this
   process still holds under their leases (worker/lease.py), and no worker restores lapsed leases until
   Redis has been up for a full visibility timeout, by which time every live worker has renewed its own.
"""

from __future__ import annotations

import logging

import redis
import tenacity
from kombu.transport import redis as kombu_redis

from .lease import held_delivery_tags

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    def append(self, message, delivery_tag) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(redis.ConnectionError),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2),
            stop=tenacity.stop_after_delay(self.channel.retry_horizon_s),
            before_sleep=lambda state: log.warning(
                "could not record delivery %s as unacked (%s); retrying", delivery_tag, state.outcome.exception()),
            reraise=True,
        )
        retrying(super().append, message, delivery_tag)

    def restore_unacked(self, client=None) -> None:
        held = [tag for tag in held_delivery_tags() if self._delivered.pop(tag, None) is not None]
        if held:
            log.info("leaving %d message(s) this worker is still running under their leases", len(held))
        super().restore_unacked(client)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        with self.channel.conn_or_acquire() as client:
            if client.info("server")["uptime_in_seconds"] < self.visibility_timeout:
                return
        super().restore_visible(start, num, interval)


class Channel(kombu_redis.Channel):
    QoS = QoS
    from_transport_options = kombu_redis.Channel.from_transport_options + ("retry_horizon_s",)
    retry_horizon_s: float = 120.0

    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel
