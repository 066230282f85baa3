"""The naive worker people write first: one pipeline call per job, upload and callback inline.

Run as `celery -A bench.naive_worker worker --pool solo` with BENCH_MODEL_DIR, BENCH_OUT_DIR set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import torch
from celery import Celery
from celery.signals import worker_process_init

app = Celery("naive", broker=os.environ.get("DIFFQUEUE_BROKER_URL"), backend=os.environ.get("DIFFQUEUE_BROKER_URL"))
app.conf.update(task_serializer="json", accept_content=["json"], worker_prefetch_multiplier=1, task_acks_late=True)
PIPELINE = {}


@worker_process_init.connect
def load(**_):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(os.environ["BENCH_MODEL_DIR"], use_safetensors=True)
    pipe.to(os.environ.get("BENCH_DEVICE", "cpu"))
    pipe.set_progress_bar_config(disable=True)
    PIPELINE["pipe"] = pipe


@app.task(name="bench.naive_generate", bind=True)
def generate(self, request: dict) -> None:
    if "pipe" not in PIPELINE:
        load()
    started = time.perf_counter()
    image = PIPELINE["pipe"](
        prompt=request["prompt"], negative_prompt=request.get("negative_prompt"),
        guidance_scale=request["guidance_scale"], num_inference_steps=request["num_inference_steps"],
        width=request["width"], height=request["height"],
        generator=torch.Generator("cpu").manual_seed(request["seed"]),
    ).images[0]
    generate_seconds = time.perf_counter() - started
    path = Path(os.environ["BENCH_OUT_DIR"]) / f"{self.request.id}.png"
    image.save(path)
    httpx.post(request["callback_url"], json={"type": "job.succeeded", "data": {
        "id": self.request.id, "timings": {"generate": generate_seconds}, "batch_size": 1}}, timeout=15)
