"""Runs one batch of compatible jobs through its model's sampler."""

from __future__ import annotations

from PIL import Image

from .jobs import Job


def run_batch(jobs: list[Job]) -> list[list[Image.Image]]:
    """Generate every job's images in one denoising loop; returns them grouped per job, in order."""
    model, shape = jobs[0].model, jobs[0].shape
    samples = [sample for job in jobs for sample in job.samples()]
    images = model.sampler(samples, shape)
    grouped, start = [], 0
    for job in jobs:
        grouped.append(images[start : start + job.request.num_images])
        start += job.request.num_images
    return grouped
