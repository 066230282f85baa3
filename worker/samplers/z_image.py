"""Z-Image (Turbo): flow matching with a single-stream DiT that takes lists of latents and captions.

Mirrors `ZImagePipeline.__call__`. Because the transformer takes lists, a batch sends negative
captions only for samples with guidance > 0: the others pay nothing for CFG.
"""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.z_image.pipeline_z_image import (
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)
from diffusers.pipelines.z_image.pipeline_z_image_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .base import BatchShape, Inpainting, Sample, Sampler, cpu_generators, encode_per_job, fresh_scheduler

MAX_SEQUENCE_LENGTH = 512


class ZImageSampler(Sampler):
    default_strength = 0.6  # ZImageImg2ImgPipeline's
    @classmethod
    def size_multiple_for(cls, vae_scale_factor: int) -> int:
        return vae_scale_factor * 2  # latents are patchified 2x2

    def needs_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 0

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        # _encode_prompt rewrites the list it is given in place; hand it a copy.
        return self.pipeline._encode_prompt(list(texts), self.device, max_sequence_length=MAX_SEQUENCE_LENGTH)

    def timesteps(self, scheduler, latent_size: tuple[int, int], steps: int) -> torch.Tensor:
        config = scheduler.config
        mu = calculate_shift(
            (latent_size[0] // 2) * (latent_size[1] // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(
            scheduler, steps, self.device, sigmas=get_default_z_image_sigmas(steps), mu=mu
        )
        scheduler.set_begin_index(0)
        return timesteps

    @torch.no_grad()
    def __call__(self, samples: list[Sample], shape: BatchShape) -> list[Image.Image]:
        pipe = self.pipeline
        cfg = self.cfg_indices(samples)
        captions = self.encode([s.prompt for s in samples])
        # Stock Z-Image encodes a missing negative prompt as "".
        captions += self.encode([samples[i].negative_prompt or "" for i in cfg]) if cfg else []
        scales = torch.tensor([samples[i].guidance_scale for i in cfg])

        scheduler = fresh_scheduler(pipe)
        generators = cpu_generators(samples)
        timesteps = self.timesteps(scheduler, self.latent_size(shape), shape.num_inference_steps)
        inpainting = None
        if shape.strength is None:
            latents = self.initial_latents(generators, shape)
        else:
            timesteps = self.truncate(scheduler, timesteps, shape)
            latents, inpainting = self.image_latents(scheduler, samples, generators, shape, timesteps[:1],
                                                     captions[0].dtype)
        for i, t in enumerate(timesteps):
            timestep = (1000 - t.expand(len(samples))) / 1000
            frames = latents.to(pipe.transformer.dtype).unsqueeze(2)
            inputs = list(frames.unbind(0)) + [frames[i] for i in cfg]
            outputs = pipe.transformer(inputs, torch.cat([timestep, timestep[cfg]]), captions, return_dict=False)[0]
            velocity = self.guide(outputs, len(samples), cfg, scales)
            latents = scheduler.step(-velocity.squeeze(2), t, latents, return_dict=False)[0]
            if inpainting:
                latents = self.blend(scheduler, inpainting, latents, timesteps, i)
        return self.decode(latents)

    def latent_size(self, shape: BatchShape) -> tuple[int, int]:
        return 2 * (shape.height // self.size_multiple), 2 * (shape.width // self.size_multiple)

    def initial_latents(self, generators: list[torch.Generator], shape: BatchShape) -> torch.Tensor:
        size = (len(generators), self.pipeline.transformer.in_channels, *self.latent_size(shape))
        # Z-Image's latents are float32 whatever the transformer's dtype.
        return randn_tensor(size, generator=generators, device=self.device, dtype=torch.float32)

    @staticmethod
    def truncate(scheduler, timesteps: torch.Tensor, shape: BatchShape) -> torch.Tensor:
        # As ZImageImg2ImgPipeline.get_timesteps (which rounds differently from SD's).
        steps = shape.num_inference_steps
        t_start = int(max(steps - min(steps * shape.strength, steps), 0)) * scheduler.order
        scheduler.set_begin_index(t_start)
        return timesteps[t_start:]

    def image_latents(self, scheduler, samples, generators, shape: BatchShape, first_timestep, dtype):
        """As ZImageImg2ImgPipeline / ZImageInpaintPipeline: the input image noised to the first timestep,
        and for inpainting what to blend back after every step."""
        vae = self.pipeline.vae
        size = {"height": shape.height, "width": shape.width}
        images = self.pipeline.image_processor.preprocess([s.image for s in samples], **size).to(torch.float32)

        def encode(batch: torch.Tensor):
            def one(i: int, generator: torch.Generator) -> torch.Tensor:
                return retrieve_latents(vae.encode(batch[i : i + 1].to(self.device, dtype)), generator=generator)
            return one

        image_latents = encode_per_job(samples, generators, encode(images))
        image_latents = (image_latents - vae.config.shift_factor) * vae.config.scaling_factor
        noise = randn_tensor(image_latents.shape, generator=generators, device=self.device, dtype=dtype)
        latents = scheduler.scale_noise(image_latents, first_timestep.repeat(len(samples)), noise)
        if not shape.inpaint:
            return latents, None
        masks = self.mask_processor.preprocess([s.mask for s in samples], **size)
        # Stock also encodes the masked image (unused here), drawing from each job's first generator.
        encode_per_job(samples, generators, encode(images * (masks < 0.5)))
        mask = torch.nn.functional.interpolate(masks, size=self.latent_size(shape), mode="nearest")
        return latents, Inpainting(image_latents, noise, mask.to(self.device, dtype))

    @staticmethod
    def blend(scheduler, inpainting: Inpainting, latents, timesteps, step: int) -> torch.Tensor:
        original = inpainting.image_latents
        if step < len(timesteps) - 1:
            original = scheduler.scale_noise(original, torch.tensor([timesteps[step + 1]]), inpainting.noise)
        return (1 - inpainting.mask) * original + inpainting.mask * latents

    @property
    def mask_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(vae_scale_factor=self.size_multiple, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True)

    @staticmethod
    def guide(outputs: list[torch.Tensor], count: int, cfg: list[int], scales: torch.Tensor) -> torch.Tensor:
        cond = torch.stack([out.float() for out in outputs[:count]])
        if not cfg:
            return cond
        uncond = torch.stack([out.float() for out in outputs[count:]])
        # Z-Image's "original" CFG form, written as stock writes it: pos + g * (pos - neg).
        scales = scales.view(-1, *([1] * (uncond.ndim - 1)))
        cond[cfg] = cond[cfg] + scales * (cond[cfg] - uncond)
        return cond

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pil")
