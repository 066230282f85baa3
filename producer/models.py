"""The job contract: what a backend service sends and what it gets back (contract version 1).

These models are the only shapes that cross the queue. The worker validates every incoming request
with `GenerationRequest` itself, because a producer may be any Celery client.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

CONTRACT_VERSION = 1
TASK_NAME = "diffqueue.generate"
DEFAULT_QUEUE = "diffqueue"

# torch.Generator.manual_seed takes any 64-bit value; image k of a job uses seed + k.
MAX_SEED = 2**63 - 1
MAX_SIDE = 8192


class Mode(str, Enum):
    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"


class OutputFormat(str, Enum):
    png = "png"
    webp = "webp"
    jpeg = "jpeg"


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.canceled)


class LoraRef(BaseModel):
    """A LoRA adapter from the worker's models file, applied at `scale`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    scale: float = Field(default=1.0, ge=-10.0, le=10.0, allow_inf_nan=False)


class GenerationRequest(BaseModel):
    """One text-to-image job. Unset fields take the model's defaults from the worker's models file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=10_000)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    negative_prompt: str | None = Field(default=None, max_length=10_000)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=100.0, allow_inf_nan=False)
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000, strict=True)
    width: int | None = Field(default=None, ge=8, le=MAX_SIDE, strict=True)
    height: int | None = Field(default=None, ge=8, le=MAX_SIDE, strict=True)
    num_images: int = Field(default=1, ge=1, le=64, strict=True)
    mode: Mode = Mode.txt2img
    image_url: HttpUrl | None = None
    mask_url: HttpUrl | None = None
    strength: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    loras: list[LoraRef] = Field(default_factory=list, max_length=8)
    output_format: OutputFormat = OutputFormat.png
    callback_url: HttpUrl | None = None
    expires_at: datetime | None = None  # not started by then: the job fails with code `expired`
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("seed")
    @classmethod
    def _seed_leaves_room_for_images(cls, seed: int | None) -> int | None:
        # seed + k must stay a valid generator seed for every image k of the job.
        if seed is not None and seed > MAX_SEED - 64:
            raise ValueError(f"must be at most {MAX_SEED - 64}")
        return seed


class ErrorInfo(BaseModel):
    code: str
    message: str
    field: str | None = None


class ImageInfo(BaseModel):
    url: str
    url_expires_at: datetime | None = None  # set when `url` is a time-limited signed (SAS) URL
    seed: int
    width: int
    height: int
    content_type: str
    sha256: str


class Timings(BaseModel):
    queued: float | None = None
    generate: float | None = None
    upload: float | None = None


class JobResult(BaseModel):
    """What the result backend holds for a job and what every webhook carries as `data`."""

    id: str
    status: JobState
    model: str | None = None
    revision: str | None = None
    images: list[ImageInfo] = Field(default_factory=list)
    error: ErrorInfo | None = None
    timings: Timings = Field(default_factory=Timings)
    batch_size: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    contract_version: int = CONTRACT_VERSION


WebhookEventType = Literal["job.started", "job.succeeded", "job.failed", "job.canceled"]


class WebhookPayload(BaseModel):
    """The body of every webhook, per Standard Webhooks' recommended shape."""

    type: WebhookEventType
    timestamp: str
    data: JobResult
