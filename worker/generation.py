"""Runs one batch of compatible jobs through its model's sampler, on the GPU thread."""

from __future__ import annotations

import time

from PIL import Image

from .jobs import Job
from .metrics import Metrics
from .registry import ModelRegistry


class BatchRunner:
    def __init__(self, registry: ModelRegistry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics

    def __call__(self, jobs: list[Job]) -> list[list[Image.Image]]:
        """Generate every job's images in one denoising loop; returns them grouped per job, in order."""
        model = self.registry.get(jobs[0].model.alias)
        self.registry.activate_loras(model, jobs[0].loras)
        samples = [sample for job in jobs for sample in job.samples()]
        started = time.perf_counter()
        images = model.sampler(samples, jobs[0].shape)
        self.metrics.generate.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(samples))
        grouped, start = [], 0
        for job in jobs:
            grouped.append(images[start : start + job.request.num_images])
            start += job.request.num_images
        return grouped
