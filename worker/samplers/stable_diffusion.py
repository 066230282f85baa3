"""SD 1.5 / 2.x and SD-Turbo: a UNet denoising loop with per-sample classifier-free guidance.

Mirrors `StableDiffusionPipeline.__call__`; only samples with guidance > 1 run the unconditional pass.
Epsilon and v-prediction are both handled by the scheduler.
"""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .base import (
    BatchShape,
    Inpainting,
    Sample,
    Sampler,
    combine_guidance,
    cpu_generators,
    encode_per_job,
    fresh_scheduler,
)


def step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    """Stochastic schedulers (Euler ancestral, DDPM, LCM) draw per-sample noise from each job's generator."""
    import inspect

    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = generators
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    return kwargs


class StableDiffusionSampler(Sampler):
    default_strength = 0.8  # StableDiffusionImg2ImgPipeline's
    @classmethod
    def size_multiple_for(cls, vae_scale_factor: int) -> int:
        return vae_scale_factor

    def needs_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1 and self.pipeline.unet.config.time_cond_proj_dim is None

    def encode(self, texts: list[str]) -> torch.Tensor:
        embeds, _ = self.pipeline.encode_prompt(texts, self.device, 1, do_classifier_free_guidance=False)
        return embeds

    @torch.no_grad()
    def __call__(self, samples: list[Sample], shape: BatchShape) -> list[Image.Image]:
        pipe = self.pipeline
        cfg = self.cfg_indices(samples)
        positive = self.encode([s.prompt for s in samples])
        # Stock SD encodes a missing negative prompt as "".
        negative = self.encode([samples[i].negative_prompt or "" for i in cfg]) if cfg else positive[:0]
        embeddings = torch.cat([negative, positive])
        scales = torch.tensor([samples[i].guidance_scale for i in cfg])

        scheduler = fresh_scheduler(pipe)
        generators = cpu_generators(samples)
        timesteps, latents, inpainting = self.start(scheduler, samples, generators, shape, positive.dtype)
        extra = step_kwargs(scheduler, generators)

        for i, t in enumerate(timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents[cfg], latents]), t)
            noise = pipe.unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False)[0]
            noise = self.guide(noise, cfg, scales)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
            if inpainting:
                latents = self.blend(scheduler, inpainting, latents, timesteps, i)
        return self.decode(latents)

    def start(self, scheduler, samples: list[Sample], generators, shape: BatchShape, dtype: torch.dtype):
        """The timesteps to run, the latents to start from, and for inpainting what to blend back."""
        timesteps, _ = retrieve_timesteps(scheduler, shape.num_inference_steps, self.device)
        if shape.strength is None:
            return timesteps, self.initial_latents(scheduler, generators, shape, dtype), None
        # As StableDiffusionImg2ImgPipeline.get_timesteps: skip the first (1 - strength) of the schedule.
        steps = shape.num_inference_steps
        t_start = max(steps - min(int(steps * shape.strength), steps), 0) * scheduler.order
        timesteps = timesteps[t_start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
        if shape.inpaint:
            return timesteps, *self.inpaint_latents(scheduler, samples, generators, shape, timesteps[:1], dtype)
        return timesteps, self.noised_image_latents(scheduler, samples, generators, timesteps[:1], dtype), None

    def inpaint_latents(self, scheduler, samples, generators, shape: BatchShape, first_timestep, dtype):
        """As StableDiffusionInpaintPipeline with a 4-channel UNet: start from the noised image (or pure noise
        at strength 1) and keep the unmasked area after every step."""
        pipe, vae = self.pipeline, self.pipeline.vae
        if pipe.unet.config.in_channels != 4:
            raise NotImplementedError("inpainting UNets with 9 input channels are not supported yet")
        size = {"height": shape.height, "width": shape.width}
        images = pipe.image_processor.preprocess([s.image for s in samples], **size).to(torch.float32)
        masks = self.mask_processor.preprocess([s.mask for s in samples], **size)
        image_latents = vae.config.scaling_factor * encode_per_job(
            samples, generators, lambda i, g: retrieve_latents(vae.encode(images[i : i + 1].to(self.device, dtype)), g))
        noise = randn_tensor(image_latents.shape, generator=generators, device=self.device, dtype=dtype)
        if shape.strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, first_timestep.repeat(len(samples)))
        # Stock also encodes the masked image (unused with a 4-channel UNet), drawing from each job's generator.
        masked = images * (masks < 0.5)
        encode_per_job(samples, generators, lambda i, g: retrieve_latents(vae.encode(masked[i : i + 1].to(self.device, dtype)), g))
        factor = pipe.vae_scale_factor
        mask = torch.nn.functional.interpolate(masks, size=(shape.height // factor, shape.width // factor))
        return latents, Inpainting(image_latents, noise, mask.to(self.device, dtype))

    @staticmethod
    def blend(scheduler, inpainting: Inpainting, latents, timesteps, step: int) -> torch.Tensor:
        original = inpainting.image_latents
        if step < len(timesteps) - 1:
            original = scheduler.add_noise(original, inpainting.noise, torch.tensor([timesteps[step + 1]]))
        return (1 - inpainting.mask) * original + inpainting.mask * latents

    @property
    def mask_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(vae_scale_factor=self.pipeline.vae_scale_factor, do_normalize=False,
                                 do_binarize=True, do_convert_grayscale=True)

    def noised_image_latents(self, scheduler, samples, generators, first_timestep, dtype) -> torch.Tensor:
        vae = self.pipeline.vae
        images = self.pipeline.image_processor.preprocess([s.image for s in samples]).to(self.device, dtype)
        # Each image is encoded with its own generator, as the stock pipeline does with a generator list.
        encoded = torch.cat([retrieve_latents(vae.encode(images[i : i + 1]), generator=generator)
                             for i, generator in enumerate(generators)])
        latents = vae.config.scaling_factor * encoded
        noise = randn_tensor(latents.shape, generator=generators, device=self.device, dtype=dtype)
        return scheduler.add_noise(latents, noise, first_timestep.repeat(len(samples)))

    def initial_latents(self, scheduler, generators, shape: BatchShape, dtype: torch.dtype) -> torch.Tensor:
        factor = self.pipeline.vae_scale_factor
        size = (len(generators), self.pipeline.unet.config.in_channels, shape.height // factor, shape.width // factor)
        latents = randn_tensor(size, generator=generators, device=self.device, dtype=dtype)
        return latents * scheduler.init_noise_sigma

    @staticmethod
    def guide(noise: torch.Tensor, cfg: list[int], scales: torch.Tensor) -> torch.Tensor:
        """Split the UNet output into [uncond of CFG samples, cond of all] and combine per sample."""
        uncond, cond = noise[: len(cfg)], noise[len(cfg) :]
        if not cfg:
            return cond
        guided = cond.clone()
        guided[cfg] = combine_guidance(cond[cfg], uncond, scales)
        return guided

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pil")
