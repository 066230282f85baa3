"""Prometheus metrics and health endpoints: /metrics, /livez, /readyz on one small HTTP server.

Names follow the Celery exporter conventions: `*_total` counters, `*_seconds` histograms, and values
read at scrape time (queue length, resident models, GPU memory) come from a collector.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("diffqueue_jobs_total", "Jobs finished, by outcome and error code",
                            ["outcome", "code"], registry=self.registry)
        self.batch_size = Histogram("diffqueue_batch_size", "Images generated together in one denoising loop",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=self.registry)
        self.queue_wait = Histogram("diffqueue_queue_wait_seconds", "From the worker taking a job to its batch "
                                    "starting", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generate = Histogram("diffqueue_generate_seconds", "Generation time of one batch",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upload = Histogram("diffqueue_upload_seconds", "Encoding and upload time of one job's images",
                                buckets=LATENCY_BUCKETS, registry=self.registry)
        self.webhook = Histogram("diffqueue_webhook_seconds", "Webhook delivery attempts, by event and result",
                                 ["event", "result"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def add_collector(self, collect: Callable[[], list[GaugeMetricFamily]]) -> None:
        self.registry.register(_CallbackCollector(collect))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CallbackCollector:
    def __init__(self, collect: Callable[[], list[GaugeMetricFamily]]) -> None:
        self._collect = collect

    def collect(self):
        try:
            yield from self._collect()
        except Exception:  # a scrape must never take the worker down
            log.exception("metrics collection failed")


def gauge(name: str, documentation: str, value: float | None = None, labels: dict[str, float] | None = None,
          label_name: str = "") -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label_name] if labels is not None else None)
    if labels is not None:
        for label, label_value in labels.items():
            family.add_metric([label], label_value)
    else:
        family.add_metric([], value)
    return family


class HealthServer:
    """Liveness: the GPU and webhook threads run and no batch is stuck. Readiness: models are warm and
    the worker is not draining. Busy is neither unhealthy nor unready."""

    def __init__(self, host: str, port: int, metrics: Metrics, is_live: Callable[[], tuple[bool, str]],
                 is_ready: Callable[[], bool]) -> None:
        handler = self._handler(metrics, is_live, is_ready)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="diffqueue-health", daemon=True)
        self.started_at = time.time()

    @staticmethod
    def _handler(metrics: Metrics, is_live, is_ready):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path == "/metrics":
                    return self._reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)
                if self.path == "/livez":
                    live, reason = is_live()
                    return self._reply(200 if live else 503, reason.encode())
                if self.path == "/readyz":
                    ready = is_ready()
                    return self._reply(200 if ready else 503, b"ready" if ready else b"not ready")
                self._reply(404, b"not found")

            def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        return Handler

    @property
    def port(self) -> int:
        return self.server.server_port

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
