"""From a raw Celery message to a validated job with every setting resolved.

A producer may be any Celery client, so nothing here trusts the message: every problem becomes a
`JobError` naming the field, and the job ends `failed` without touching any other job.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any

from diffqueue.producer.models import MAX_SEED, GenerationRequest, Mode
from PIL import Image
from pydantic import ValidationError

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
    loras: tuple[tuple[str, float], ...]


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
    mask_image: Image.Image | None = None
    strength: float | None = None
    loras: tuple[tuple[str, float], ...] = ()  # sorted (name, scale): jobs batch only with the same set

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.model.alias, self.request.mode, self.width, self.height, self.num_inference_steps,
                        self.strength, self.loras)

    @property
    def shape(self) -> BatchShape:
        return BatchShape(self.width, self.height, self.num_inference_steps, self.strength,
                          self.request.mode is Mode.inpaint)

    def expired(self, now: float | None = None) -> bool:
        expires_at = self.request.expires_at
        if expires_at is None:
            return False
        if expires_at.tzinfo is None:  # a naive time is taken as UTC
            expires_at = expires_at.replace(tzinfo=timezone.utc)
        return (now or time.time()) > expires_at.timestamp()

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.request.num_images

    def samples(self) -> list[Sample]:
        return [
            Sample(self.request.prompt, self.negative_prompt, self.guidance_scale, self.seed + k, self.init_image,
                   self.mask_image, k)
            for k in range(self.request.num_images)
        ]


def raw_field(kwargs: Any, name: str) -> Any:
    """A field of a message's request that may not validate: None unless kwargs['request'] is a dict."""
    raw = kwargs.get("request") if isinstance(kwargs, dict) else None
    return raw.get(name) if isinstance(raw, dict) else None


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
        raise JobError("invalid_request", f"{field_name}: {first['msg']}", field_name) from None


FetchImage = Callable[[str, str], Image.Image]  # (url, field name) -> image


def resolve_job(job_id: str, request: GenerationRequest, registry: ModelRegistry, fetch_image: FetchImage,
                priority: int = 0) -> Job:
    """Apply the model's defaults, check its limits, and fetch input images."""
    alias = request.model or registry.default_alias
    model = registry.info(alias)
    if model is None:
        raise JobError("invalid_request", f"model: unknown model {alias!r}", "model")
    if request.mode not in model.modes:
        raise JobError("unsupported", f"mode: {request.mode.value} is not served for {model.family} yet", "mode")
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
        loras=resolve_loras(request, registry),
    )
    check_limits(job)
    if request.mode is not Mode.txt2img:
        attach_inputs(job, fetch_image)
    return job


def attach_inputs(job: Job, fetch_image: FetchImage) -> None:
    """img2img and inpaint: the strength, and the input image (and mask) at the job's size."""
    mode, request = job.request.mode, job.request
    if request.image_url is None:
        raise JobError("invalid_request", f"image_url: required for {mode.value}", "image_url")
    if mode is Mode.inpaint and request.mask_url is None:
        raise JobError("invalid_request", "mask_url: required for inpaint", "mask_url")
    default = job.model.default_inpaint_strength if mode is Mode.inpaint else job.model.default_strength
    job.strength = request.strength if request.strength is not None else default
    if int(job.num_inference_steps * job.strength) < 1:
        raise JobError("invalid_request", "strength: num_inference_steps * strength must be at least 1", "strength")
    size = (job.width, job.height)
    # The output has the job's size, so inputs are brought to it first (stock would keep the input's).
    job.init_image = fetch_image(str(request.image_url), "image_url").resize(size, Image.Resampling.BICUBIC)
    if mode is Mode.inpaint:
        job.mask_image = fetch_image(str(request.mask_url), "mask_url").resize(size, Image.Resampling.NEAREST)


def resolve_loras(request: GenerationRequest, registry: ModelRegistry) -> tuple[tuple[str, float], ...]:
    names = [lora.name for lora in request.loras]
    for index, name in enumerate(names):
        if name not in registry.models_file.loras:
            raise JobError("invalid_request", f"loras.{index}.name: unknown LoRA {name!r}", f"loras.{index}.name")
    if len(set(names)) != len(names):
        raise JobError("invalid_request", "loras: each LoRA may appear once", "loras")
    return tuple(sorted((lora.name, lora.scale) for lora in request.loras))


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
