"""A real webhook endpoint for the fault suite: verifies every signature, records every delivery, and can be
taken down and brought back on the same port."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook

from diffqueue.local_redis import free_port


@dataclass(frozen=True)
class Received:
    webhook_id: str
    event_type: str
    job_id: str


class WebhookReceiver:
    def __init__(self, secret: str) -> None:
        self.verifier = Webhook(secret)
        self.port = free_port()
        self.received: list[Received] = []
        self.bad_signatures = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> "WebhookReceiver":
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler_class())
        threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: connections are refused until start()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def terminal_events(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.event_type != "job.started"]

    def _record(self, body: bytes, headers: dict[str, str]) -> bool:
        try:
            self.verifier.verify(body, headers)
        except Exception:
            with self._lock:
                self.bad_signatures += 1
            return False
        payload = json.loads(body)
        with self._lock:
            self.received.append(Received(headers["webhook-id"], payload["type"], payload["data"]["id"]))
        return True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                ok = receiver._record(body, {k.lower(): v for k, v in self.headers.items()})
                self.send_response(204 if ok else 401)
                self.end_headers()

            def log_message(self, *args) -> None:  # quiet
                pass

        return Handler
