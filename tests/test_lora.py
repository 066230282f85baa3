"""LoRA adapters: resolved from the models file, never batched with other adapter sets, equal to stock."""

from __future__ import annotations

import numpy as np
import torch

from tests.helpers import max_pixel_difference, read_image, wait_result


def stock_image(pipe, job: dict) -> np.ndarray:
    image = pipe(prompt=job["prompt"], guidance_scale=job["guidance_scale"], num_inference_steps=4, width=64,
                 height=64, generator=torch.Generator("cpu").manual_seed(job["seed"])).images[0]
    return np.asarray(image)


def test_lora_jobs_batch_apart_and_match_stock_with_the_adapter(batching_worker, celery_sender, tiny_model_dirs,
                                                               tiny_lora):
    from diffusers import DiffusionPipeline

    plain = {"prompt": "a red fox", "seed": 11, "guidance_scale": 6.0, "model": "sd"}
    styled = {**plain, "loras": [{"name": "style", "scale": 0.8}]}
    styled_too = {**styled, "seed": 12}
    ids = [batching_worker.send(celery_sender, job) for job in (plain, styled, styled_too)]
    results = [wait_result(celery_sender, job_id) for job_id in ids]
    assert all(r["status"] == "succeeded" for r in results), results
    # The two LoRA jobs batch together; the plain job never joins them.
    assert [r["batch_size"] for r in results] == [1, 2, 2]

    pipe = DiffusionPipeline.from_pretrained(tiny_model_dirs["sd"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    without = stock_image(pipe, plain)
    pipe.load_lora_weights(str(tiny_lora.parent), weight_name=tiny_lora.name, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    for job, result in zip((styled, styled_too), results[1:]):
        assert max_pixel_difference(read_image(result["images"][0]["url"])[1], stock_image(pipe, job)) <= 3
    plain_pixels = read_image(results[0]["images"][0]["url"])[1]
    assert max_pixel_difference(plain_pixels, without) <= 3
    assert max_pixel_difference(plain_pixels, stock_image(pipe, plain)) > 12, "the adapter changes the picture"


def test_plain_job_after_a_lora_job_has_no_adapter(worker, celery_sender):
    plain = {"prompt": "a boat", "seed": 3, "model": "sd"}
    first = wait_result(celery_sender, worker.send(celery_sender, plain))
    wait_result(celery_sender, worker.send(celery_sender, {**plain, "loras": [{"name": "style"}]}))
    again = wait_result(celery_sender, worker.send(celery_sender, plain))
    assert first["images"][0]["sha256"] == again["images"][0]["sha256"]


def test_unknown_lora_fails_naming_it(worker, celery_sender):
    result = wait_result(celery_sender, worker.send(celery_sender, {"prompt": "x", "loras": [{"name": "nope"}]}))
    assert result["status"] == "failed" and result["error"]["field"] == "loras.0.name"
