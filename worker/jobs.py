"""From a raw Celery message to a validated job with every setting resolved.

A producer may be any Celery client, so nothing here trusts the message: every problem becomes a
`JobError` naming the field, and the job ends `failed` without touching any other job.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pydantic import ValidationError

from diffqueue.producer.models import MAX_SEED, GenerationRequest, Mode

from .registry import ModelInfo, ModelRegistry
from .samplers import BatchShape, Sample


class JobError(Exception):
    """A job that cannot run. `code` is machine-readable; `field` names the request field at fault."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True)
class BatchKey:
    """Jobs batch together only when all of these match."""

    model: str
    mode: Mode
    width: int
    height: int
    num_inference_steps: int
    strength: float | None


@dataclass
class Job:
    id: str
    request: GenerationRequest
    model: ModelInfo
    seed: int
    guidance_scale: float
    num_inference_steps: int
    width: int
    height: int
    negative_prompt: str | None
    priority: int = 0
    received_at: float = field(default_factory=time.time)
    init_image: Image.Image | None = None
    strength: float | None = None

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.model.alias, self.request.mode, self.width, self.height, self.num_inference_steps,
                        self.strength)

    @property
    def shape(self) -> BatchShape:
        return BatchShape(self.width, self.height, self.num_inference_steps, self.strength)

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.request.num_images

    def samples(self) -> list[Sample]:
        return [
            Sample(self.request.prompt, self.negative_prompt, self.guidance_scale, self.seed + k, self.init_image, k)
            for k in range(self.request.num_images)
        ]


def parse_request(args: tuple, kwargs: dict[str, Any]) -> GenerationRequest:
    if args:
        raise JobError("invalid_request", "positional arguments are not accepted; send kwargs={'request': {...}}",
                       "request")
    unexpected = sorted(set(kwargs) - {"request"})
    if unexpected:
        raise JobError("invalid_request", f"unexpected task kwargs {unexpected}; send kwargs={{'request': {{...}}}}",
                       "request")
    raw = kwargs.get("request")
    if not isinstance(raw, dict):
        raise JobError("invalid_request", "kwargs['request'] must be a JSON object", "request")
    try:
        return GenerationRequest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        field_name = ".".join(str(part) for part in first["loc"]) or "request"
        return_msg = f"{field_name}: {first['msg']}"
        raise JobError("invalid_request", return_msg, field_name) from None


FetchImage = Callable[[str, str], Image.Image]  # (url, field name) -> image


def resolve_job(job_id: str, request: GenerationRequest, registry: ModelRegistry, fetch_image: FetchImage,
                priority: int = 0) -> Job:
    """Apply the model's defaults, check its limits, and fetch input images."""
    alias = request.model or registry.default_alias
    model = registry.info(alias)
    if model is None:
        raise JobError("invalid_request", f"model: unknown model {alias!r}", "model")
    if request.mode is Mode.inpaint:
        raise JobError("unsupported", "mode: inpaint is not supported by this worker yet", "mode")
    spec = model.spec
    default_width, default_height = model.default_size
    job = Job(
        id=job_id,
        request=request,
        model=model,
        seed=request.seed if request.seed is not None else secrets.randbelow(MAX_SEED - 64),
        guidance_scale=spec.defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
        num_inference_steps=request.num_inference_steps or spec.defaults.num_inference_steps,
        width=request.width or default_width,
        height=request.height or default_height,
        negative_prompt=request.negative_prompt if request.negative_prompt is not None
        else spec.defaults.negative_prompt,
        priority=priority,
    )
    check_limits(job)
    if request.mode is Mode.img2img:
        attach_input_image(job, fetch_image)
    return job


def attach_input_image(job: Job, fetch_image: FetchImage) -> None:
    if job.request.image_url is None:
        raise JobError("invalid_request", "image_url: required for img2img", "image_url")
    job.strength = job.request.strength if job.request.strength is not None else job.model.default_strength
    if int(job.num_inference_steps * job.strength) < 1:
        raise JobError("invalid_request", "strength: num_inference_steps * strength must be at least 1", "strength")
    image = fetch_image(str(job.request.image_url), "image_url")
    # The output has the job's size, so the input is brought to it first (stock would keep the input's).
    job.init_image = image if image.size == (job.width, job.height) else image.resize(
        (job.width, job.height), Image.Resampling.BICUBIC)


def check_limits(job: Job) -> None:
    limits, multiple = job.model.spec.limits, job.model.size_multiple
    for name in ("width", "height"):
        value = getattr(job, name)
        if value % multiple:
            raise JobError("invalid_request", f"{name}: must be a multiple of {multiple} for this model", name)
    if job.width * job.height > limits.max_pixels:
        field_name = "height" if job.request.height else "width"
        raise JobError(
            "invalid_request",
            f"{field_name}: {job.width}x{job.height} exceeds this model's limit of {limits.max_pixels} pixels",
            field_name,
        )
    if job.num_inference_steps > limits.max_steps:
        raise JobError("invalid_request", f"num_inference_steps: at most {limits.max_steps} for this model",
                       "num_inference_steps")
    if job.request.num_images > limits.max_images:
        raise JobError("invalid_request", f"num_images: at most {limits.max_images} for this model", "num_images")
