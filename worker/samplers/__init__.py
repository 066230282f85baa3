"""One sampler per model family, each built from its pipeline's own components."""

from __future__ import annotations

from .base import BatchShape, Sample, Sampler
from .stable_diffusion import StableDiffusionSampler
from .stable_diffusion_xl import StableDiffusionXLSampler
from .z_image import ZImageSampler

SAMPLERS: dict[str, type[Sampler]] = {
    "StableDiffusionPipeline": StableDiffusionSampler,
    "StableDiffusionXLPipeline": StableDiffusionXLSampler,
    "ZImagePipeline": ZImageSampler,
}


class UnsupportedPipeline(ValueError):
    pass


def sampler_for(pipeline) -> Sampler:
    name = type(pipeline).__name__
    if name not in SAMPLERS:
        raise UnsupportedPipeline(f"{name} is not supported; supported: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](pipeline)


__all__ = ["BatchShape", "Sample", "Sampler", "UnsupportedPipeline", "sampler_for"]
