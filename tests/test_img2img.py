"""img2img and inpaint through the worker: inputs fetched over HTTP, batched, equal to the stock pipelines."""

from __future__ import annotations

import io

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import max_pixel_difference, read_image, wait_result


def input_png(seed: int = 0, side: int = 64) -> bytes:
    pixels = (np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(side: int = 64) -> bytes:
    pixels = np.zeros((side, side), dtype=np.uint8)
    pixels[side // 4 : 3 * side // 4, side // 8 : 5 * side // 8] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


STOCK = {
    ("sd", "img2img"): diffusers.StableDiffusionImg2ImgPipeline,
    ("zimage", "img2img"): diffusers.ZImageImg2ImgPipeline,
    ("sd", "inpaint"): diffusers.StableDiffusionInpaintPipeline,
    ("zimage", "inpaint"): diffusers.ZImageInpaintPipeline,
}


@pytest.mark.parametrize("family, mode, strength", [
    ("sd", "img2img", 0.75), ("zimage", "img2img", 0.75), ("sd", "inpaint", 1.0), ("sd", "inpaint", 0.6),
    ("zimage", "inpaint", 1.0), ("zimage", "inpaint", 0.6)])
def test_batch_matches_the_stock_pipeline_per_job(family, mode, strength, batching_worker, celery_sender,
                                                  httpserver, stock_pipelines):
    httpserver.expect_request("/inputs/image.png").respond_with_data(input_png(), content_type="image/png")
    httpserver.expect_request("/inputs/mask.png").respond_with_data(mask_png(), content_type="image/png")
    high = 2.5 if family == "zimage" else 6.0
    jobs = [
        {"prompt": "a red fox", "seed": 11, "guidance_scale": high, "num_images": 2},
        {"prompt": "blue sky", "negative_prompt": "blurry", "seed": 5, "guidance_scale": high},
        {"prompt": "a cat", "seed": 3, "guidance_scale": 0.0},
    ]
    common = {"model": family, "mode": mode, "image_url": httpserver.url_for("/inputs/image.png"),
              "strength": strength, "num_inference_steps": 4}
    extra = {}
    if mode == "inpaint":
        common["mask_url"] = httpserver.url_for("/inputs/mask.png")
        extra = {"mask_image": Image.open(io.BytesIO(mask_png())), "height": 64, "width": 64}
    ids = [batching_worker.send(celery_sender, {**job, **common}) for job in jobs]
    results = [wait_result(celery_sender, job_id) for job_id in ids]

    stock = STOCK[family, mode].from_pipe(stock_pipelines(family))
    init = Image.open(io.BytesIO(input_png())).convert("RGB")
    for job, result in zip(jobs, results):
        assert result["status"] == "succeeded", result
        assert result["batch_size"] == 4
        count = job.get("num_images", 1)
        expected = stock(prompt=job["prompt"], image=init, negative_prompt=job.get("negative_prompt"),
                         guidance_scale=job["guidance_scale"], num_inference_steps=4, strength=strength,
                         num_images_per_prompt=count,
                         generator=[torch.Generator("cpu").manual_seed(job["seed"] + k) for k in range(count)],
                         **extra).images
        for image, reference in zip(result["images"], expected, strict=True):
            assert max_pixel_difference(read_image(image["url"])[1], np.asarray(reference)) <= 3


def test_img2img_differs_from_txt2img_and_follows_the_input(worker, celery_sender, httpserver):
    for seed in (0, 1):
        httpserver.expect_request(f"/inputs/{seed}.png").respond_with_data(input_png(seed), content_type="image/png")
    base = {"prompt": "a fox", "seed": 4, "model": "sd", "num_inference_steps": 4}
    txt = wait_result(celery_sender, worker.send(celery_sender, base))
    from_0, from_1 = (wait_result(celery_sender, worker.send(celery_sender, {
        **base, "mode": "img2img", "image_url": httpserver.url_for(f"/inputs/{seed}.png"), "strength": 0.5}))
        for seed in (0, 1))
    hashes = {r["images"][0]["sha256"] for r in (txt, from_0, from_1)}
    assert len(hashes) == 3


@pytest.mark.parametrize("mode, path, body, field", [
    ("img2img", None, None, "image_url"),  # no image_url at all
    ("img2img", "/inputs/missing.png", None, "image_url"),  # 404
    ("img2img", "/inputs/garbage.png", b"this is not an image", "image_url"),
    ("inpaint", "/inputs/fine.png", input_png(), "mask_url"),  # no mask_url
])
def test_bad_input_image_fails_naming_the_field(worker, celery_sender, httpserver, mode, path, body, field):
    request = {"prompt": "x", "mode": mode, "model": "sd"}
    if path:
        if body is not None:
            httpserver.expect_request(path).respond_with_data(body)
        request["image_url"] = httpserver.url_for(path)
    result = wait_result(celery_sender, worker.send(celery_sender, request))
    assert result["status"] == "failed" and result["error"]["field"] == field, result


def test_bad_mask_fails_naming_mask_url(worker, celery_sender, httpserver):
    httpserver.expect_request("/inputs/good.png").respond_with_data(input_png(), content_type="image/png")
    httpserver.expect_request("/inputs/bad-mask.png").respond_with_data(b"GIF89a broken")
    result = wait_result(celery_sender, worker.send(celery_sender, {
        "prompt": "x", "mode": "inpaint", "model": "zimage", "image_url": httpserver.url_for("/inputs/good.png"),
        "mask_url": httpserver.url_for("/inputs/bad-mask.png")}))
    assert result["status"] == "failed" and result["error"]["field"] == "mask_url", result


def test_strength_too_low_for_the_steps_is_refused(worker, celery_sender, httpserver):
    httpserver.expect_request("/inputs/ok.png").respond_with_data(input_png(), content_type="image/png")
    result = wait_result(celery_sender, worker.send(celery_sender, {
        "prompt": "x", "mode": "img2img", "image_url": httpserver.url_for("/inputs/ok.png"), "strength": 0.1,
        "num_inference_steps": 4}))
    assert result["error"]["field"] == "strength"
