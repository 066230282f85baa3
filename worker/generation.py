"""Runs one batch of compatible jobs through its model's sampler, on the GPU thread."""

from __future__ import annotations

import time

import torch
from PIL import Image

from .jobs import Job
from .metrics import Metrics
from .registry import ModelRegistry


class BatchRunner:
    def __init__(self, registry: ModelRegistry, metrics: Metrics, fault_oom_above_batch: int | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        # Fault injection: raise the OOM error CUDA would, on any device, for batches above this size.
        self.fault_oom_above_batch = fault_oom_above_batch

    def __call__(self, jobs: list[Job]) -> list[list[Image.Image]]:
        """Generate every job's images in one denoising loop; returns them grouped per job, in order."""
        model = self.registry.get(jobs[0].model.alias)
        self.registry.activate_loras(model, jobs[0].loras)
        samples = [sample for job in jobs for sample in job.samples()]
        if self.fault_oom_above_batch is not None and len(samples) > self.fault_oom_above_batch:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fault injection: batch of {len(samples)} > "
                                         f"{self.fault_oom_above_batch})")
        started = time.perf_counter()
        images = model.sampler(samples, jobs[0].shape)
        self.metrics.generate.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(samples))
        grouped, start = [], 0
        for job in jobs:
            grouped.append(images[start : start + job.request.num_images])
            start += job.request.num_images
        return grouped
