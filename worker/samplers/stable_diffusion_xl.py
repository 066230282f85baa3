"""SDXL and SDXL-Turbo: two text encoders, pooled embeddings and size time ids, per-sample guidance.

Mirrors `StableDiffusionXLPipeline.__call__`. With `force_zeros_for_empty_prompt`, a job without a
negative prompt gets zero negative embeddings, exactly as stock SDXL gives it, while "" is encoded.
"""

from __future__ import annotations

import torch
from diffqueue.producer.models import Mode
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from PIL import Image

from .base import BatchShape, Sample, cpu_generators, fresh_scheduler
from .stable_diffusion import StableDiffusionSampler, step_kwargs


class StableDiffusionXLSampler(StableDiffusionSampler):
    default_strength = 0.3  # StableDiffusionXLImg2ImgPipeline's
    modes = frozenset({Mode.txt2img})  # img2img and inpaint for SDXL are not served yet
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            texts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled

    def encode_negatives(
        self, samples: list[Sample], cfg: list[int], positive: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        zeros_for_missing = self.pipeline.config.force_zeros_for_empty_prompt
        embeds, pooled_out = positive[cfg].clone(), pooled[cfg].clone()
        texts = {row: samples[i].negative_prompt for row, i in enumerate(cfg)}
        to_encode = {row: text or "" for row, text in texts.items() if text is not None or not zeros_for_missing}
        for row in texts.keys() - to_encode.keys():
            embeds[row], pooled_out[row] = 0, 0
        if to_encode:
            rows = sorted(to_encode)
            encoded, encoded_pooled = self.encode([to_encode[row] for row in rows])
            embeds[rows], pooled_out[rows] = encoded, encoded_pooled
        return embeds, pooled_out

    def time_ids(self, shape: BatchShape, dtype: torch.dtype, count: int) -> torch.Tensor:
        size = (shape.height, shape.width)
        ids = self.pipeline._get_add_time_ids(
            size, (0, 0), size, dtype=dtype,
            text_encoder_projection_dim=self.pipeline.text_encoder_2.config.projection_dim,
        )
        return ids.to(self.device).repeat(count, 1)

    @torch.no_grad()
    def __call__(self, samples: list[Sample], shape: BatchShape) -> list[Image.Image]:
        pipe, device = self.pipeline, self.device
        cfg = self.cfg_indices(samples)
        positive, pooled = self.encode([s.prompt for s in samples])
        negative, negative_pooled = self.encode_negatives(samples, cfg, positive, pooled)
        embeddings = torch.cat([negative, positive])
        added = {
            "text_embeds": torch.cat([negative_pooled, pooled]),
            "time_ids": self.time_ids(shape, positive.dtype, len(cfg) + len(samples)),
        }
        scales = torch.tensor([samples[i].guidance_scale for i in cfg])

        scheduler = fresh_scheduler(pipe)
        timesteps, _ = retrieve_timesteps(scheduler, shape.num_inference_steps, device)
        generators = cpu_generators(samples)
        latents = self.initial_latents(scheduler, generators, shape, positive.dtype)
        extra = step_kwargs(scheduler, generators)
        scheduler.set_begin_index(0)

        for t in timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents[cfg], latents]), t)
            noise = pipe.unet(
                model_input, t, encoder_hidden_states=embeddings, added_cond_kwargs=added, return_dict=False
            )[0]
            noise = self.guide(noise, cfg, scales)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        return self.decode(latents)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        # SDXL's VAE overflows in fp16; stock upcasts it for the decode when its config says so.
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = latents.to(next(vae.post_quant_conv.parameters()).dtype) / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        return self.pipeline.image_processor.postprocess(image, output_type="pil")
