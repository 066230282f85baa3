"""A private redis-server on a free loopback port, for `make demo` and the tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = "redis-server is not installed: run `sudo apt-get install redis-server` (Debian/Ubuntu) " \
               "or `brew install redis` (macOS)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRedis:
    """redis-server bound to 127.0.0.1 with append-only persistence, so a restart keeps the queue."""

    def __init__(self, directory: Path | None = None, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError(INSTALL_HINT)
        self.directory = Path(directory or tempfile.mkdtemp(prefix="diffqueue-redis-"))
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "LocalRedis":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        """Shut down (SIGTERM), or die at once (SIGKILL): with fsync always, neither loses a write."""
        if self.process and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=10)

    def restart(self, down_s: float = 0.0, kill: bool = False) -> None:
        self.stop(kill=kill)
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
