"""`make bench`: the limit, the naive worker and diffqueue on the same jobs, side by side, in one run.

    python -m bench.run                       # CPU, small random-weight SD, 32 jobs
    python -m bench.run --device cuda --arch sd-turbo|sdxl|z-image   # full-size architectures on a GPU

Prints a table and writes JSON to bench/results/. Ratios, not absolute times, are the point: this
machine is noisy, so every number comes from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from celery import Celery

from diffqueue.local_redis import LocalRedis, free_port

from .limit import run_limit
from .workload import Workload

ROOT = Path(__file__).resolve().parent.parent


class Receiver:
    """A webhook receiver that notes when each job's terminal event arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[str, tuple[float, dict]] = {}
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                self.send_response(200)
                self.end_headers()
                if body["type"] != "job.started":
                    with receiver.changed:
                        receiver.arrivals[body["data"]["id"]] = (time.time(), body["data"])
                        receiver.changed.notify_all()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hook"

    def wait(self, ids: list[str], timeout: float = 1800) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: all(i in self.arrivals for i in ids), timeout):
                raise TimeoutError(f"{sum(i not in self.arrivals for i in ids)} webhooks never arrived")


class Contender:
    """A worker process fed through a Celery task name: diffqueue or the naive baseline."""

    def __init__(self, name: str, task: str, queue: str, command: list[str], env: dict[str, str]) -> None:
        self.name, self.task, self.queue = name, task, queue
        self.process = subprocess.Popen(command, env={**os.environ, **env}, cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def send(self, app: Celery, request: dict) -> str:
        job_id = str(uuid.uuid4())
        app.send_task(self.task, kwargs={"request": request}, task_id=job_id, queue=self.queue)
        return job_id

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


def measure(contender: Contender, app: Celery, receiver: Receiver, requests: list[dict], sequential: int) -> dict:
    receiver.wait([contender.send(app, requests[0])])  # warm-up: model load and first call
    started = time.time()
    ids = [contender.send(app, request) for request in requests]
    receiver.wait(ids)
    burst_seconds = max(receiver.arrivals[i][0] for i in ids) - started

    added = []
    for request in requests[:sequential]:
        sent = time.time()
        job_id = contender.send(app, request)
        receiver.wait([job_id])
        arrived, data = receiver.arrivals[job_id]
        added.append(arrived - sent - data["timings"]["generate"])
    batch_sizes = [receiver.arrivals[i][1]["batch_size"] for i in ids]
    return {
        "seconds": burst_seconds,
        "images_per_second": len(ids) / burst_seconds,
        "mean_batch_size": statistics.mean(batch_sizes),
        "added_latency_p50_ms": 1000 * statistics.median(added),
        "added_latency_p99_ms": 1000 * percentile(added, 0.99),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def build_model(args: argparse.Namespace, workdir: Path) -> Path:
    if args.arch:
        from .architectures import write_full_size_model

        return write_full_size_model(workdir / args.arch, args.arch)
    from diffqueue.worker.tiny_models import write_tiny_model

    return write_tiny_model(workdir / args.family, args.family, args.size)


def run(args: argparse.Namespace) -> dict:
    from diffusers import DiffusionPipeline

    workdir = Path(tempfile.mkdtemp(prefix="diffqueue-bench-"))
    model_dir = build_model(args, workdir)
    workload = Workload(str(model_dir), args.jobs, args.steps, args.side, args.max_batch, args.cfg_scale)

    pipe = DiffusionPipeline.from_pretrained(model_dir, use_safetensors=True, dtype=_dtype(args)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    requests = workload.requests()
    run_limit(pipe, requests[: args.max_batch], args.max_batch)  # warm-up
    limit_seconds = run_limit(pipe, requests, args.max_batch)
    del pipe

    (workdir / "models.toml").write_text(
        f'default = "bench"\n[models.bench]\nsource = "{model_dir}"\ndtype = "{args.dtype}"\n'
        f"limits = {{ max_pixels = {args.side * args.side}, max_steps = {args.steps}, max_images = 1 }}\n"
    )
    (workdir / "naive").mkdir()
    results = {}
    with LocalRedis(workdir / "redis") as redis_server:
        receiver = Receiver()
        app = Celery("bench", broker=redis_server.url, backend=redis_server.url)
        app.conf.update(task_serializer="json", accept_content=["json"])
        requests = workload.requests(receiver.url)
        common = {"DIFFQUEUE_BROKER_URL": redis_server.url, "BENCH_DEVICE": args.device,
                  "DIFFQUEUE_DEVICE": args.device}
        contenders = {
            "naive": lambda: Contender(
                "naive", "bench.naive_generate", "naive",
                [sys.executable, "-m", "celery", "-A", "bench.naive_worker", "worker", "--pool", "solo", "-Q",
                 "naive", "--loglevel", "WARNING"],
                {**common, "BENCH_MODEL_DIR": str(model_dir), "BENCH_OUT_DIR": str(workdir / "naive")},
            ),
            "diffqueue": lambda: Contender(
                "diffqueue", "diffqueue.generate", "bench",
                [sys.executable, "-m", "diffqueue.cli", "worker", "--loglevel", "WARNING"],
                {**common, "DIFFQUEUE_QUEUE": "bench", "DIFFQUEUE_MODELS_FILE": str(workdir / "models.toml"),
                 "DIFFQUEUE_STORAGE_URL": (workdir / "images").as_uri(), "DIFFQUEUE_MAX_BATCH": str(args.max_batch),
                 "DIFFQUEUE_WEBHOOK_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                 "DIFFQUEUE_ALLOW_PRIVATE_CALLBACKS": "1", "DIFFQUEUE_WEBHOOK_POLL_S": "0.02"},
            ),
        }
        for name, start in contenders.items():
            contender = start()
            try:
                results[name] = measure(contender, app, receiver, requests, args.sequential)
            finally:
                contender.stop()
    return report(args, limit_seconds, results)


def _dtype(args: argparse.Namespace):
    import torch

    return getattr(torch, args.dtype)


def report(args: argparse.Namespace, limit_seconds: float, results: dict) -> dict:
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, " \
             f"{os.cpu_count()} cores"
    summary = {
        "machine": {"device": device, "torch": torch.__version__, "python": platform.python_version()},
        "workload": {"model": args.arch or f"{args.family} ({args.size}, random weights)", "jobs": args.jobs,
                     "steps": args.steps, "side": args.side, "max_batch": args.max_batch,
                     "cfg_jobs": "every other job", "dtype": args.dtype},
        "limit": {"seconds": limit_seconds, "images_per_second": args.jobs / limit_seconds},
        **results,
        "efficiency": limit_seconds / results["diffqueue"]["seconds"],
        "speedup_over_naive": results["naive"]["seconds"] / results["diffqueue"]["seconds"],
    }
    print(f"\nmachine: {device}; torch {torch.__version__}; workload: {summary['workload']}")
    print(f"{'':>10} {'seconds':>9} {'img/s':>7} {'batch':>6} {'added p50 ms':>13} {'added p99 ms':>13}")
    print(f"{'limit':>10} {limit_seconds:9.2f} {args.jobs / limit_seconds:7.2f}")
    for name, row in results.items():
        print(f"{name:>10} {row['seconds']:9.2f} {row['images_per_second']:7.2f} {row['mean_batch_size']:6.2f} "
              f"{row['added_latency_p50_ms']:13.1f} {row['added_latency_p99_ms']:13.1f}")
    print(f"efficiency (limit / diffqueue) = {summary['efficiency']:.3f}; "
          f"speed-up over naive = {summary['speedup_over_naive']:.2f}x")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd", choices=["sd", "sdxl", "zimage"])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--arch", choices=["sd-turbo", "sdxl", "z-image"], help="full-size architecture (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--sequential", type=int, default=8, help="jobs sent one at a time for added latency")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    summary = run(args)
    out = args.out or ROOT / "bench" / "results" / f"{args.arch or args.family}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
