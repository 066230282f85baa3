"""What every sampler shares: the per-image inputs of a batch and the seeding rule."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffqueue.producer.models import Mode
from PIL import Image


@dataclass(frozen=True)
class Sample:
    """One image to generate. A job with num_images=n contributes n samples with seeds seed..seed+n-1."""

    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    seed: int
    image: Image.Image | None = None  # img2img / inpaint: the input image, already at the batch's size
    mask: Image.Image | None = None  # inpaint: white = regenerate, black = keep
    index_in_job: int = 0  # k for image k of its job


@dataclass(frozen=True)
class BatchShape:
    """What every sample of one batch has in common."""

    width: int
    height: int
    num_inference_steps: int
    strength: float | None = None  # img2img and inpaint only
    inpaint: bool = False


def cpu_generators(samples: list[Sample]) -> list[torch.Generator]:
    # The contract: image k of a job comes from torch.Generator("cpu").manual_seed(seed + k), on any device.
    return [torch.Generator("cpu").manual_seed(sample.seed) for sample in samples]


@dataclass
class Inpainting:
    """What the denoising loop blends back after every step: the input's latents outside the mask."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor  # latent-sized, 1 where the image is regenerated


def encode_per_job(samples: list[Sample], generators: list[torch.Generator],
                   encode: Callable[[int, torch.Generator], torch.Tensor]) -> torch.Tensor:
    """Stock pipelines encode a job's input once, with the generator of its first image, and reuse it."""
    encoded = []
    for i, sample in enumerate(samples):
        if sample.index_in_job == 0:
            current = encode(i, generators[i])
        encoded.append(current)
    return torch.cat(encoded)


def fresh_scheduler(pipeline):
    """A scheduler of the pipeline's own class and config; schedulers hold per-run state."""
    return pipeline.scheduler.__class__.from_config(pipeline.scheduler.config)


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`uncond + g * (cond - uncond)` with one g per sample, as the stock pipelines compute it."""
    scales = scales.to(device=cond.device, dtype=cond.dtype).view(-1, *([1] * (cond.ndim - 1)))
    return uncond + scales * (cond - uncond)


class Sampler(ABC):
    """Generates a batch of samples with one pipeline's components; one call at a time per pipeline."""

    default_strength: float  # img2img strength when a job sets none: the stock pipeline's default
    default_inpaint_strength: float = 1.0  # the stock inpaint pipelines' default
    modes: frozenset[Mode] = frozenset(Mode)

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    @classmethod
    @abstractmethod
    def size_multiple_for(cls, vae_scale_factor: int) -> int:
        """Width and height must be multiples of this, for a VAE with this scale factor."""

    @property
    def size_multiple(self) -> int:
        return self.size_multiple_for(self.pipeline.vae_scale_factor)

    @abstractmethod
    def needs_cfg(self, guidance_scale: float) -> bool:
        """Whether the stock pipeline runs an unconditional pass at this guidance scale."""

    @abstractmethod
    def __call__(self, samples: list[Sample], shape: BatchShape) -> list[Image.Image]:
        """One image per sample, in order."""

    def cfg_indices(self, samples: list[Sample]) -> list[int]:
        return [i for i, sample in enumerate(samples) if self.needs_cfg(sample.guidance_scale)]
