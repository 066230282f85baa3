"""Full-size architectures with random weights, for GPU benchmarks (speed does not depend on weights).

The configs are those of stabilityai/sd-turbo (SD 2.1 UNet, OpenCLIP ViT-H text encoder),
stabilityai/sdxl-turbo (SDXL UNet, CLIP-L + OpenCLIP bigG) and Tongyi-MAI/Z-Image-Turbo (6B S3-DiT,
Qwen3-4B text encoder, 16-channel VAE). Tokenizers are the small offline ones: they change token ids,
not the shapes the GPU sees.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffqueue.worker.tiny_models import build_clip_tokenizer, build_qwen_tokenizer

ARCHITECTURES = ("sd-turbo", "sdxl", "z-image")


def _vae(latent_channels: int, scaling_factor: float, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        latent_channels=latent_channels, norm_num_groups=32, scaling_factor=scaling_factor, **extra,
    )


def _scheduler(cls, **config):
    with torch.device("cpu"):  # schedulers compute with numpy, even when models are built on "meta"
        return cls(**config)


def _clip(hidden: int, layers: int, heads: int, act: str, projection_dim: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, hidden_act=act, projection_dim=projection_dim,
                            vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_sd_turbo():
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    )
    scheduler = _scheduler(EulerDiscreteScheduler, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", timestep_spacing="trailing")
    return StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=_vae(4, 0.18215, sample_size=768),
        text_encoder=_clip(1024, 23, 16, "gelu", 512), tokenizer=build_clip_tokenizer(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def build_sdxl():
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    scheduler = _scheduler(EulerAncestralDiscreteScheduler, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", timestep_spacing="trailing")
    return StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler, vae=_vae(4, 0.13025, sample_size=1024, force_upcast=True),
        text_encoder=_clip(768, 12, 12, "quick_gelu", 768),
        text_encoder_2=_clip(1280, 32, 20, "gelu", 1280, with_projection=True),
        tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(), add_watermarker=False,
    )


def build_z_image():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    transformer = ZImageTransformer2DModel()  # the class defaults are the released 6B model
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1_000_000.0, tie_word_embeddings=True,
    ))
    vae = _vae(16, 0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
               force_upcast=True)
    scheduler = _scheduler(FlowMatchEulerDiscreteScheduler, num_train_timesteps=1000, shift=3.0,
                           use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                          tokenizer=build_qwen_tokenizer(), transformer=transformer)


BUILDERS = {"sd-turbo": build_sd_turbo, "sdxl": build_sdxl, "z-image": build_z_image}


def build_full_size_pipeline(arch: str, dtype: torch.dtype = torch.bfloat16):
    """Random weights, allocated directly in `dtype` to halve host memory."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return BUILDERS[arch]()
    finally:
        torch.set_default_dtype(previous)


def write_full_size_model(directory: Path, arch: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    pipeline = build_full_size_pipeline(arch, dtype)
    if arch == "z-image":
        with torch.no_grad():
            pipeline.transformer.x_pad_token.normal_()
            pipeline.transformer.cap_pad_token.normal_()
    pipeline.save_pretrained(directory, safe_serialization=True)
    return Path(directory)
