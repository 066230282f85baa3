"""kombu's Redis transport, made safe for kill -9 and Redis restarts. The worker's Celery app uses it
(`broker_transport`).

Four holes in kombu 5.7.0's transport lose or duplicate jobs when a worker or Redis dies:

1. A message is taken with BRPOP and only then recorded in the `unacked` hash. A worker SIGKILLed between
   the two loses the message for good (the fault suite saw 1 job lost in 3 kills). Here fetching is one
   Lua script that pops the message and records it as unacked atomically. The worker still sleeps in
   Redis while the queue is empty, on `BLMOVE queue queue RIGHT RIGHT`, which returns the tail element
   without moving it (a rotation of one list onto its own end is a no-op) as soon as there is one.

2. Work on a channel whose broker connection is already gone (acking a task from before the restart,
   restoring unacked messages while closing the lost connection) fails with AttributeError inside
   `_connparams`. That is not a connection error, so Celery exits the worker. Here it is a ConnectionError,
   which kombu and Celery already handle.
3. A message is popped from the queue (BRPOP) and only then written to the `unacked` hash. If Redis goes
   away between the two, the message exists nowhere but in this process, and kombu drops it. Here the
   write is retried until Redis is back (for up to `retry_horizon_s`) before the message is delivered.
4. Closing a lost connection re-queues every message the channel delivered, including those still
   running in this process, and after a restart any worker re-queues messages whose leases look lapsed
   only because Redis was down. Both make a job run twice. Here a closing channel leaves the messages this
   process still holds under their leases (worker/lease.py), and no worker restores lapsed leases until
   Redis has been up for a full visibility timeout, by which time every live worker has renewed its own.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from queue import Empty

import redis
import tenacity
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from .lease import held_delivery_tags

log = logging.getLogger(__name__)

# KEYS: the lists to take from, in priority order, then unacked_index and unacked. ARGV[1]: now.
# The element is read before it is popped, so a malformed one never makes the script fail half-way.
POP_AND_RECORD = """
local index_key, unacked_key = KEYS[#KEYS - 1], KEYS[#KEYS]
for i = 1, #KEYS - 2 do
  local item = redis.call('LINDEX', KEYS[i], -1)
  if item then
    local ok, message = pcall(cjson.decode, item)
    redis.call('RPOP', KEYS[i])
    if ok and type(message) == 'table' and type(message['properties']) == 'table'
        and message['properties']['delivery_tag'] then
      local properties = message['properties']
      local info = properties['delivery_info'] or {}
      local tag = properties['delivery_tag']
      redis.call('ZADD', index_key, ARGV[1], tag)
      redis.call('HSET', unacked_key, tag, '[' .. item .. ',' .. cjson.encode(info['exchange'] or '') .. ','
                 .. cjson.encode(info['routing_key'] or '') .. ']')
    end
    return {KEYS[i], item}
  end
end
return false
"""


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

    @cached_property
    def _pop_and_record(self):
        return self.client.register_script(POP_AND_RECORD)  # EVALSHA; reloaded after a Redis restart

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Wait (in Redis) until the first queue has a message, without taking it; see _brpop_read."""
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._fetch_keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        first = self._fetch_keys[0]
        # Messages on the other priority lists are picked up when this wait times out (brpop_timeout, 1 s).
        self.client.connection.send_command("BLMOVE", first, first, "RIGHT", "RIGHT",
                                            timeout or self.brpop_timeout or 1)

    def _brpop_read(self, **options) -> bool:
        try:
            try:
                self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next iteration reconnects
                raise
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
        popped = self._pop_and_record(keys=[*self._fetch_keys, self.unacked_index_key, self.unacked_key],
                                      args=[time.time()], client=self.client)
        if not popped:
            raise Empty()
        dest, item = popped
        dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(dest)
        self.connection._deliver(loads(bytes_to_str(item)), dest)
        return True

    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel
