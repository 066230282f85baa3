"""Mixed batches through the worker equal stock diffusers run on each job alone (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_MODELS
from tests.helpers import max_pixel_difference, read_image, wait_result

TOLERANCE = 3  # levels out of 255, CPU float32


def mixed_jobs(family: str) -> list[dict]:
    """Guidance on both sides of the family's CFG threshold, with and without negatives, num_images > 1."""
    high, low = (2.5, 0.0) if family == "zimage" else (6.0, 1.0)
    return [
        {"prompt": "a red fox", "seed": 11, "guidance_scale": high, "num_images": 2},
        {"prompt": "blue sky over hills", "negative_prompt": "blurry", "seed": 5, "guidance_scale": high + 1},
        {"prompt": "a green tree", "negative_prompt": "ugly", "seed": 7, "guidance_scale": low},
        {"prompt": "a cat", "seed": 3, "guidance_scale": 0.0},
        {"prompt": "a dog", "negative_prompt": "", "seed": 9, "guidance_scale": high},
        {"prompt": "a house", "seed": 21, "guidance_scale": 0.5 if family == "zimage" else 1.5},
    ]


def stock_images(pipe, job: dict, steps: int, side: int) -> list[np.ndarray]:
    count = job.get("num_images", 1)
    images = pipe(
        prompt=job["prompt"], negative_prompt=job.get("negative_prompt"), guidance_scale=job["guidance_scale"],
        num_inference_steps=steps, width=side, height=side, num_images_per_prompt=count,
        generator=[torch.Generator("cpu").manual_seed(job["seed"] + k) for k in range(count)],
    ).images
    return [np.asarray(image.convert("RGB")) for image in images]


@pytest.mark.parametrize("family", ["sd", "sd2", "sd-turbo", "sdxl", "sdxl-turbo", "zimage"])
def test_mixed_batch_matches_stock_pipeline_per_job(family, batching_worker, celery_sender, stock_pipelines):
    _, steps, _, side = TINY_MODELS[family]
    jobs = mixed_jobs(family)
    ids = [batching_worker.send(celery_sender, {**job, "model": family}) for job in jobs]
    results = [wait_result(celery_sender, job_id) for job_id in ids]
    total_images = sum(job.get("num_images", 1) for job in jobs)

    pipe = stock_pipelines(family)
    for job, result in zip(jobs, results):
        assert result["status"] == "succeeded", result
        assert result["batch_size"] == total_images, "the jobs were expected to run as one batch"
        for image, expected in zip(result["images"], stock_images(pipe, job, steps, side), strict=True):
            _, pixels = read_image(image["url"])
            assert max_pixel_difference(pixels, expected) <= TOLERANCE, (family, job)


@pytest.mark.parametrize("family", ["sd", "sdxl", "zimage"])
def test_guidance_and_negative_prompt_change_the_picture(family, stock_pipelines):
    """Keeps the oracle honest: the settings it checks visibly change the output on these tiny models."""
    _, steps, _, side = TINY_MODELS[family]
    pipe = stock_pipelines(family)
    base = {"prompt": "a red fox", "seed": 11, "guidance_scale": 0.0}
    plain = stock_images(pipe, base, steps, side)[0]
    guided = stock_images(pipe, {**base, "guidance_scale": 6.0}, steps, side)[0]
    negative = stock_images(pipe, {**base, "guidance_scale": 6.0, "negative_prompt": "snow"}, steps, side)[0]
    assert max_pixel_difference(plain, guided) > 4 * TOLERANCE
    assert max_pixel_difference(guided, negative) > 4 * TOLERANCE


def test_a_job_gives_the_same_bytes_alone_and_in_a_batch(batching_worker, worker, celery_sender):
    job = {"prompt": "a lighthouse", "seed": 42, "guidance_scale": 4.0, "model": "sd"}
    alone = wait_result(celery_sender, worker.send(celery_sender, job))
    assert alone["batch_size"] == 1
    single_batch = wait_result(celery_sender, batching_worker.send(celery_sender, job))
    assert single_batch["batch_size"] == 1
    assert read_image(alone["images"][0]["url"])[0] == read_image(single_batch["images"][0]["url"])[0]
