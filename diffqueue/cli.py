"""The `diffqueue` command line: worker, submit, status, cancel, queue, demo, tiny-model, webhooks.

Producer commands import only the producer SDK; worker commands import torch lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffqueue.producer import Client, GenerationRequest, JobNotFound, QueueSettings


def _client() -> Client:
    return Client(QueueSettings())


def cmd_worker(args: argparse.Namespace) -> int:
    from diffqueue.worker.main import run_worker
    from diffqueue.worker.settings import WorkerSettings

    overrides = {
        name: value
        for name, value in {
            "models_file": args.models_file, "storage_url": args.storage_url, "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms, "device": args.device, "concurrency": args.concurrency,
            "queue": args.queue,
        }.items()
        if value is not None
    }
    return run_worker(WorkerSettings(**overrides), loglevel=args.loglevel)


def cmd_submit(args: argparse.Namespace) -> int:
    fields = {
        "prompt": args.prompt, "model": args.model, "negative_prompt": args.negative_prompt, "seed": args.seed,
        "guidance_scale": args.guidance_scale, "num_inference_steps": args.steps, "width": args.width,
        "height": args.height, "num_images": args.num_images, "callback_url": args.callback_url,
        "output_format": args.output_format,
        "metadata": json.loads(args.metadata) if args.metadata else None,
    }
    request = GenerationRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    client = _client()
    job_id = client.submit(request, job_id=args.job_id, priority=args.priority)
    if not args.wait:
        print(job_id)
        return 0
    result = client.wait(job_id, timeout=args.timeout)
    print(result.model_dump_json(indent=2))
    return 0 if result.status.value == "succeeded" else 1


def cmd_status(args: argparse.Namespace) -> int:
    try:
        print(_client().status(args.job_id).model_dump_json(indent=2))
    except JobNotFound:
        print(f"unknown job {args.job_id}", file=sys.stderr)
        return 1
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _client().cancel(args.job_id)
    print(f"cancel requested for {args.job_id}")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    print(_client().pending())
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from diffqueue.worker.tiny_models import write_tiny_model

    print(write_tiny_model(Path(args.directory), args.family, args.size))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from diffqueue.demo import run_demo

    return run_demo(Path(args.workdir), jobs=args.jobs)


def cmd_webhooks(args: argparse.Namespace) -> int:
    import redis

    from diffqueue.producer.connection import RedisKeys
    from diffqueue.worker.webhooks import WebhookOutbox

    settings = QueueSettings()
    outbox = WebhookOutbox(redis.Redis.from_url(settings.broker_url), RedisKeys(settings.key_prefix), None)
    if args.action == "dead":
        for delivery in outbox.dead():
            print(json.dumps({"id": delivery.id, "type": delivery.event_type, "url": delivery.url,
                              "attempts": delivery.attempts, "error": delivery.last_error}))
    else:
        print(f"replayed {outbox.replay()} webhook(s)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import json as json_module

    from diffqueue.worker.registry import ModelsFile, download
    from diffqueue.worker.settings import WorkerSettings

    settings = WorkerSettings()
    models_file = ModelsFile.load(settings.models_file)
    failures = 0
    if args.action == "list":
        print(f"{'alias':<16} {'state':<8} {'family':<28} {'revision':<42} source")
    for alias, spec in models_file.models.items():
        try:
            folder, revision = download(spec, settings.hf_cache_dir, local_only=args.action == "list")
            family = json_module.loads((folder / "model_index.json").read_text())["_class_name"]
        except Exception as error:  # noqa: BLE001 (report every model, then fail)
            failures += 1
            if args.action == "list":
                print(f"{alias:<16} {'missing':<8} {'?':<28} {spec.revision or 'main':<42} {spec.source}")
            else:
                print(f"{alias}: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        if args.action == "list":
            print(f"{alias:<16} {'cached':<8} {family:<28} {revision:<42} {spec.source}")
        else:
            print(f"{alias} {revision} {folder}")
    return 1 if failures and args.action == "pull" else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffqueue", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a GPU worker (settings from DIFFQUEUE_* env, flags win)")
    worker.add_argument("--models-file", type=Path)
    worker.add_argument("--storage-url")
    worker.add_argument("--queue")
    worker.add_argument("--max-batch", type=int)
    worker.add_argument("--max-wait-ms", type=int)
    worker.add_argument("--concurrency", type=int)
    worker.add_argument("--device")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    submit = commands.add_parser("submit", help="enqueue a job; prints its id (or its result with --wait)")
    submit.add_argument("prompt")
    submit.add_argument("--model")
    submit.add_argument("--negative-prompt")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--guidance-scale", type=float)
    submit.add_argument("--steps", type=int)
    submit.add_argument("--width", type=int)
    submit.add_argument("--height", type=int)
    submit.add_argument("--num-images", type=int)
    submit.add_argument("--output-format", choices=["png", "webp", "jpeg"])
    submit.add_argument("--callback-url")
    submit.add_argument("--metadata", help="a JSON object echoed back in the result")
    submit.add_argument("--job-id", help="idempotency key: submitting an existing id returns that job")
    submit.add_argument("--priority", type=int, help="Celery priority; on Redis 0 is the highest")
    submit.add_argument("--wait", action="store_true")
    submit.add_argument("--timeout", type=float, default=600.0)
    submit.set_defaults(func=cmd_submit)

    for name, func, text in (("status", cmd_status, "print a job's result"),
                             ("cancel", cmd_cancel, "cancel a job that has not started generating")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id")
        command.set_defaults(func=func)

    commands.add_parser("queue", help="pending jobs (what KEDA scales on)").set_defaults(func=cmd_queue)

    tiny = commands.add_parser("tiny-model", help="write a small random-weight pipeline (safetensors)")
    tiny.add_argument("directory")
    tiny.add_argument("--family", default="sd", choices=["sd", "sd2", "sd-turbo", "sdxl", "sdxl-turbo", "zimage"])
    tiny.add_argument("--size", default="tiny", choices=["tiny", "small"])
    tiny.set_defaults(func=cmd_tiny_model)

    demo = commands.add_parser("demo", help="private Redis + tiny model + worker + a few jobs, then clean up")
    demo.add_argument("--workdir", default=".demo")
    demo.add_argument("--jobs", type=int, default=6)
    demo.set_defaults(func=cmd_demo)

    models = commands.add_parser("models", help="list the models file's models, or pull them into the cache")
    models.add_argument("action", choices=["list", "pull"])
    models.set_defaults(func=cmd_models)

    webhooks = commands.add_parser("webhooks", help="dead-lettered webhooks: list or resend")
    webhooks.add_argument("action", choices=["dead", "replay"])
    webhooks.set_defaults(func=cmd_webhooks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
