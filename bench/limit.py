"""The limit: stock diffusers on the same jobs in optimal batches, with nothing around it.

Stock pipelines take one guidance scale per call, so jobs are grouped by guidance scale and cut into
batches of max_batch, each call with its own prompts, negative prompts and one CPU generator per image.
"""

from __future__ import annotations

import time
from itertools import groupby

import torch


def run_limit(pipe, requests: list[dict], max_batch: int) -> float:
    by_guidance = sorted(requests, key=lambda r: r["guidance_scale"])
    started = time.perf_counter()
    for guidance, group in groupby(by_guidance, key=lambda r: r["guidance_scale"]):
        group = list(group)
        for start in range(0, len(group), max_batch):
            batch = group[start : start + max_batch]
            negatives = [r.get("negative_prompt") or "" for r in batch]
            pipe(
                prompt=[r["prompt"] for r in batch],
                negative_prompt=negatives if guidance > 1 else None,
                guidance_scale=guidance,
                num_inference_steps=batch[0]["num_inference_steps"],
                width=batch[0]["width"],
                height=batch[0]["height"],
                generator=[torch.Generator("cpu").manual_seed(r["seed"]) for r in batch],
            )
    return time.perf_counter() - started
