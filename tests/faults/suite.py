"""The fault suite: real workers on a private Redis, Azurite and a webhook receiver, and one fault after
another while valid and malformed jobs keep arriving. It ends with a table of what happened to every job.

Each step submits a slice of the job stream, then injects one fault while jobs are in flight and measures
how long the system takes to recover from it:

- kill -9 of the worker holding the most jobs: until every job it held has a terminal result;
- SIGTERM to a worker's whole process group mid-batch: until it has drained and exited (code 0 asserted);
- Redis killed and restarted (append-only, fsync always): from Redis back until a probe job succeeds;
- Azurite down: from storage back until every job submitted during the outage has finished;
- webhook receiver down: from receiver back until every webhook due so far has arrived;
- jobs too big for the OOM switch (DIFFQUEUE_FAULT_OOM_ABOVE_BATCH): they fail alone as `out_of_memory`.

A supervisor restarts every worker the suite kills or stops, as Azure Container Apps would.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import states
from diffqueue.producer import Client, GenerationRequest, QueueSettings
from diffqueue.producer.models import TASK_NAME
from kombu import Connection
from kombu.exceptions import OperationalError

from diffqueue.local_redis import LocalRedis
from tests.faults.payloads import Malformed, malformed_messages
from tests.faults.receiver import WebhookReceiver
from tests.helpers import Azurite, WorkerProcess, wait_for

# The runtime's one log line per finished job (worker/runtime.py, _finish).
FINISHED = re.compile(r"diffqueue\.worker\.runtime: job (\S+) (?:succeeded|failed|canceled)(?: \(|$)", re.M)
PICKLE = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.", "application/x-python-serialize"
OOM_ABOVE_BATCH = 3


@dataclass(frozen=True)
class Plan:
    name: str
    workers: int
    valid_jobs: int
    malformed: int
    undecodable: int
    faults: tuple[str, ...]
    outage_s: float = 6.0
    oom_jobs: int = 3


SHORT = Plan("short", workers=2, valid_jobs=120, malformed=400, undecodable=5,
             faults=("kill", "sigterm", "redis", "storage", "receiver", "oom"))
LONG = Plan("long", workers=3, valid_jobs=600, malformed=3000, undecodable=20, outage_s=10, oom_jobs=8,
            faults=("kill", "storage", "kill", "redis", "sigterm", "receiver", "kill", "oom", "redis", "sigterm"))


@dataclass
class Expected:
    """What must become of one submitted job."""

    status: str
    codes: tuple[str, ...] = ()
    field: str | None = None
    webhook: bool = False
    submitted_at: str = dataclasses.field(default_factory=lambda: time.strftime("%H:%M:%S"))


@dataclass
class Report:
    plan: Plan
    expected: dict[str, Expected] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    finishes: Counter = field(default_factory=Counter)
    recoveries: list[tuple[str, float, str]] = field(default_factory=list)
    webhooks_expected: int = 0
    webhooks_delivered: int = 0
    webhook_resends: int = 0
    bad_signatures: int = 0
    restarts: int = 0
    unexpected: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def lost(self) -> list[str]:
        return [job_id for job_id in self.expected if job_id not in self.results]

    @property
    def run_twice(self) -> list[str]:
        return [job_id for job_id, count in self.finishes.items() if count > 1]

    def outcome_counts(self) -> Counter:
        counts = Counter()
        for result in self.results.values():
            error = result.get("error") or {}
            counts[result["status"] + (f" ({error['code']})" if error else "")] += 1
        return counts

    def table(self) -> str:
        valid = sum(1 for e in self.expected.values() if e.status == "succeeded" or "out_of_memory" in e.codes)
        rows = [("jobs submitted", f"{len(self.expected)} ({valid} valid, {len(self.expected) - valid} malformed)")]
        rows += [(f"  {outcome}", str(n)) for outcome, n in sorted(self.outcome_counts().items())]
        rows += [
            ("finishes logged by workers", str(sum(self.finishes.values()))),
            ("lost (no terminal result)", str(len(self.lost))),
            ("run twice (finished more than once)", str(len(self.run_twice))),
            ("results not as expected", str(len(self.unexpected))),
            ("terminal webhooks delivered / expected", f"{self.webhooks_delivered} / {self.webhooks_expected}"),
            ("  re-sent with the same webhook-id", str(self.webhook_resends)),
            ("  bad signatures", str(self.bad_signatures)),
            ("workers killed or stopped, then restarted", str(self.restarts)),
            ("wall time", f"{self.seconds:.0f} s"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"Fault suite ({self.plan.name}): {self.plan.workers} workers", "",
                 f"| {'':{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {label:{width}} | {value} |" for label, value in rows]
        lines += ["", "| fault | seconds to recover | measured until |", "|---|---|---|"]
        lines += [f"| {fault} | {seconds:.1f} | {until} |" for fault, seconds, until in self.recoveries]
        return "\n".join(lines)


class FaultSuite:
    def __init__(self, plan: Plan, workdir: Path, model_dir: Path, lora_file: Path, secret: str) -> None:
        self.plan = plan
        self.workdir = workdir
        self.secret = secret
        self.queue = f"faults-{uuid.uuid4().hex[:6]}"
        self.models_file = workdir / "models.toml"
        self.models_file.write_text(
            f'default = "sd"\n[models.sd]\nsource = "{model_dir}"\n'
            'defaults = { num_inference_steps = 6, guidance_scale = 5.0, width = 64, height = 64 }\n'
            'limits = { max_pixels = 16384, max_steps = 50, max_images = 4 }\n'
            f'[loras.style]\nsource = "{lora_file}"\n'
        )
        self.redis = LocalRedis(workdir / "redis")
        self.storage = Azurite(workdir / "azurite")
        self.receiver = WebhookReceiver(secret)
        self.workers: list[WorkerProcess] = []
        self.retired: list[WorkerProcess] = []
        self.report = Report(plan)
        self.client: Client | None = None

    # ---------- setup ----------

    def __enter__(self) -> "FaultSuite":
        self.redis.start()
        self.storage.start()
        self.receiver.start()
        self.client = Client(QueueSettings(broker_url=self.redis.url, queue=self.queue, visibility_timeout_s=6,
                                           restore_interval_s=2))
        self.workers = [self._worker() for _ in range(self.plan.workers)]
        for worker in self.workers:
            worker.launch()
        for worker in self.workers:
            worker.wait_ready(180)
        return self

    def __exit__(self, *exc) -> None:
        for worker in self.workers:
            worker.kill()
        if self.client:
            self.client.close()
        self.receiver.stop()
        self.storage.stop()
        self.redis.stop()

    def _worker(self) -> WorkerProcess:
        return WorkerProcess(
            self.redis.url, self.models_file, self.workdir / "images", self.secret, queue=self.queue,
            DIFFQUEUE_VISIBILITY_TIMEOUT_S="6", DIFFQUEUE_RESTORE_INTERVAL_S="2",
            DIFFQUEUE_MAX_WAIT_MS="200", DIFFQUEUE_MAX_BATCH="8",
            DIFFQUEUE_FAULT_OOM_ABOVE_BATCH=str(OOM_ABOVE_BATCH),
            DIFFQUEUE_STORAGE_URL="azure://faults", AZURE_STORAGE_CONNECTION_STRING=self.storage.connection_string,
            DIFFQUEUE_AZURE_RETRY_TOTAL="1", DIFFQUEUE_STORAGE_RETRY_HORIZON_S="180",
            DIFFQUEUE_WEBHOOK_RETRY_MAX_S="2", DIFFQUEUE_WEBHOOK_LEASE_S="5",
            OMP_NUM_THREADS="1",  # several workers share this machine's cores
        )

    # ---------- the job stream ----------

    def stream(self) -> list[Callable[[], str]]:
        """Every submission of the run, valid and malformed interleaved, as callables returning the job id."""
        malformed = malformed_messages(self.plan.malformed, self.receiver.url)
        valid = [self._valid(i) for i in range(self.plan.valid_jobs)]
        bad = [self._malformed(m) for m in malformed] + [self._undecodable for _ in range(self.plan.undecodable)]
        stride = max(1, len(bad) // max(1, len(valid)))
        mixed: list[Callable[[], str]] = []
        for i, submit in enumerate(valid):
            mixed.append(submit)
            mixed.extend(bad[i * stride:(i + 1) * stride])
        mixed.extend(bad[len(valid) * stride:])
        return mixed

    def _valid(self, index: int, num_images: int = 1) -> Callable[[], str]:
        def submit() -> str:
            job_id = str(uuid.uuid4())
            oom = num_images > OOM_ABOVE_BATCH
            self.report.expected[job_id] = Expected("failed" if oom else "succeeded",
                                                    ("out_of_memory",) if oom else (), webhook=True)
            request = GenerationRequest(prompt=f"fault suite {index}", seed=index, num_images=num_images,
                                        callback_url=self.receiver.url)
            self.client.submit(request, job_id=job_id)
            return job_id

        return submit

    def _malformed(self, message: Malformed) -> Callable[[], str]:
        def submit() -> str:
            job_id = str(uuid.uuid4())
            self.report.expected[job_id] = Expected("failed", ("invalid_request", "unsupported"), message.field,
                                                    webhook=message.has_callback)
            self.client.app.send_task(TASK_NAME, args=message.args, kwargs=message.kwargs, task_id=job_id,
                                      queue=self.queue)
            return job_id

        return submit

    def _undecodable(self) -> str:
        job_id = str(uuid.uuid4())
        self.report.expected[job_id] = Expected("failed", ("invalid_message",), "request")
        with Connection(self.redis.url) as connection:
            connection.Producer().publish(
                PICKLE[0], routing_key=self.queue, content_type=PICKLE[1], content_encoding="binary",
                headers={"id": job_id, "task": TASK_NAME, "lang": "py", "argsrepr": "", "kwargsrepr": ""},
                declare=[],
            )
        return job_id

    # ---------- faults ----------

    def run(self) -> Report:
        started = time.monotonic()
        progress(f"{self.plan.name} plan: {self.plan.faults}")
        stream = self.stream()
        slices = len(self.plan.faults) + 1
        size = -(-len(stream) // slices)
        for step, fault in enumerate(self.plan.faults):
            submitted = [submit() for submit in stream[step * size:(step + 1) * size]]
            progress(f"{len(submitted)} jobs submitted; fault: {fault}")
            getattr(self, f"_fault_{fault}")(submitted)
        for submit in stream[len(self.plan.faults) * size:]:
            submit()
        self._collect()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _fault_kill(self, submitted: list[str]) -> None:
        victim, held = self._busiest_worker()
        victim.kill()
        killed_at = time.monotonic()
        self._replace(victim)
        self._wait_terminal(held, timeout=180)
        self._recovered("kill -9 a worker holding %d jobs" % len(held), killed_at, "its jobs finished elsewhere")

    def _fault_sigterm(self, submitted: list[str]) -> None:
        victim, held = self._busiest_worker()
        os.killpg(victim.process.pid, signal.SIGTERM)  # as Azure Container Apps does: every process
        stopped_at = time.monotonic()
        code = victim.process.wait(timeout=180)
        if code != 0:
            self.report.unexpected.append(f"worker exited with {code} on SIGTERM")
        self._recovered(f"SIGTERM mid-batch (holding {len(held)} jobs)", stopped_at, "drained and exited 0")
        self._replace(victim)

    def _fault_redis(self, submitted: list[str]) -> None:
        self._submit_batch(8)
        wait_for(lambda: self.client.redis.hlen("unacked") > 0, timeout=30)
        during = threading.Thread(target=self._submit_batch, args=(8,))  # producers ride out the outage
        self.redis.stop(kill=True)
        during.start()
        time.sleep(self.plan.outage_s)
        self.redis.start()
        back_at = time.monotonic()
        probe = self._valid(10_000 + len(self.report.recoveries))()
        self._wait_terminal([probe], timeout=240)
        self._recovered(f"Redis killed for {self.plan.outage_s:.0f} s", back_at, "a probe job succeeded")
        during.join(timeout=240)

    def _fault_storage(self, submitted: list[str]) -> None:
        self.storage.stop()
        during = [self._valid(20_000 + i)() for i in range(8)]
        time.sleep(self.plan.outage_s)
        self.storage.start()
        back_at = time.monotonic()
        self._wait_terminal(during, timeout=240)
        self._recovered(f"Azurite down for {self.plan.outage_s:.0f} s", back_at, "jobs held in upload finished")

    def _fault_receiver(self, submitted: list[str]) -> None:
        self.receiver.stop()
        during = [self._valid(30_000 + i)() for i in range(8)]
        self._wait_terminal(during, timeout=240)
        time.sleep(self.plan.outage_s)
        self.receiver.start()
        back_at = time.monotonic()
        wait_for(lambda: self._webhooks_missing(during) == 0, timeout=240, interval=0.2)
        self._recovered(f"webhook receiver down for {self.plan.outage_s:.0f} s", back_at,
                        "its missed webhooks arrived")

    def _fault_oom(self, submitted: list[str]) -> None:
        jobs = [self._valid(40_000 + i, num_images=OOM_ABOVE_BATCH + 1)() for i in range(self.plan.oom_jobs)]
        jobs += [self._valid(41_000 + i)() for i in range(8)]
        started = time.monotonic()
        self._wait_terminal(jobs, timeout=240)
        self._recovered(f"OOM switch: {self.plan.oom_jobs} jobs too big, batches split", started,
                        "every job finished")

    # ---------- helpers ----------

    def _submit_batch(self, count: int) -> None:
        for i in range(count):
            self._valid(50_000 + i)()

    def _busiest_worker(self) -> tuple[WorkerProcess, list[str]]:
        """The worker holding the most jobs, once one holds at least two (more are sent until one does)."""
        def busiest():
            by_host = {w.hostname: w for w in self.workers if w.process.poll() is None}
            try:
                active = self.client.app.control.inspect(timeout=1.0, limit=len(by_host)).active() or {}
            except (redis.ConnectionError, OperationalError):  # a stale broadcast connection after a restart
                return None
            held = sorted(((len(tasks), host, [t["id"] for t in tasks]) for host, tasks in active.items()
                           if host in by_host), reverse=True)
            if held and held[0][0] >= 2:
                return by_host[held[0][1]], held[0][2]
            self._submit_batch(6)
            return None

        return wait_for(busiest, timeout=60, interval=0.05)

    def _replace(self, victim: WorkerProcess) -> None:
        self.workers.remove(victim)
        self.retired.append(victim)
        self.report.restarts += 1
        replacement = self._worker().launch()
        self.workers.append(replacement)

    def _recovered(self, fault: str, since: float, until: str) -> None:
        self.report.recoveries.append((fault, time.monotonic() - since, until))
        progress(f"recovered from {fault} in {time.monotonic() - since:.1f} s")

    def _terminal(self, job_id: str) -> dict | None:
        meta = self.client.app.backend.get_task_meta(job_id, cache=False)
        if meta.get("status") != states.SUCCESS:
            return None
        return meta["result"] if meta["result"]["status"] in ("succeeded", "failed", "canceled") else None

    def _wait_terminal(self, job_ids: list[str], timeout: float) -> None:
        remaining = set(job_ids)
        deadline = time.monotonic() + timeout
        while remaining and time.monotonic() < deadline:
            remaining = {job_id for job_id in remaining if self._terminal(job_id) is None}
            time.sleep(0.2)

    def _webhooks_missing(self, job_ids: list[str]) -> int:
        delivered = {r.job_id for r in self.receiver.terminal_events()}
        return sum(1 for job_id in job_ids if job_id not in delivered)

    def _collect(self) -> None:
        report = self.report
        progress(f"all {len(report.expected)} jobs submitted; waiting for every result and webhook")
        self._wait_terminal(list(report.expected), timeout=180)
        for job_id in report.expected:
            result = self._terminal(job_id)
            if result is not None:
                report.results[job_id] = result
        expecting = [job_id for job_id, e in report.expected.items() if e.webhook]
        try:
            wait_for(lambda: self._webhooks_missing(expecting) == 0, timeout=120, interval=0.5)
        except TimeoutError:
            pass
        self._count_webhooks(expecting)
        self._count_finishes()
        report.unexpected += [message for job_id, e in report.expected.items() if job_id in report.results
                              if (message := mismatch(job_id, e, report.results[job_id]))]

    def _count_webhooks(self, expecting: list[str]) -> None:
        events = self.receiver.terminal_events()
        by_job: dict[str, set[str]] = {}
        for event in events:
            by_job.setdefault(event.job_id, set()).add(event.webhook_id)
        self.report.webhooks_expected = len(expecting)
        self.report.webhooks_delivered = sum(1 for job_id in expecting if len(by_job.get(job_id, ())) == 1)
        self.report.webhook_resends = len(events) - sum(len(ids) for ids in by_job.values())
        self.report.bad_signatures = self.receiver.bad_signatures
        self.report.unexpected += [f"{job_id}: {len(ids)} different terminal webhooks"
                                   for job_id, ids in by_job.items() if len(ids) > 1]
        self.report.unexpected += [f"{job_id}: webhook for a job that expects none" for job_id in by_job
                                   if job_id in self.report.expected and not self.report.expected[job_id].webhook]

    def _count_finishes(self) -> None:
        for worker in self.workers + self.retired:
            for job_id in FINISHED.findall(worker.log_path.read_text(errors="replace")):
                self.report.finishes[job_id] += 1


def progress(message: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", flush=True)


def mismatch(job_id: str, expected: Expected, result: dict) -> str | None:
    error = result.get("error") or {}
    if result["status"] != expected.status:
        return f"{job_id}: {result['status']} {error}, expected {expected.status}"
    if expected.codes and error.get("code") not in expected.codes:
        return f"{job_id}: code {error.get('code')}, expected one of {expected.codes}"
    if expected.field is not None and (error.get("field") or "").split(".")[0] != expected.field:
        return f"{job_id}: field {error.get('field')!r}, expected {expected.field!r} ({error.get('message')})"
    return None
