"""Small random-weight pipelines built offline, for tests, demos and CPU benchmarks.

The architectures follow diffusers' own pipeline tests; tokenizers are byte-level BPE vocabularies
written on the spot, so nothing is downloaded. Pipelines are saved with `save_pretrained` (safetensors)
and load through the same code path as a Hub snapshot.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

import torch

Family = Literal["sd", "sd2", "sd-turbo", "sdxl", "sdxl-turbo", "zimage"]
FAMILIES: tuple[str, ...] = ("sd", "sd2", "sd-turbo", "sdxl", "sdxl-turbo", "zimage")
Size = Literal["tiny", "small"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: every byte has a printable stand-in, so no prompt hits <unk>."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _write_bpe(folder: Path, vocab: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_clip_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        _write_bpe(Path(tmp), vocab)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def build_qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab = _byte_alphabet() + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    with tempfile.TemporaryDirectory() as tmp:
        _write_bpe(Path(tmp), vocab)
        tokenizer = Qwen2Tokenizer.from_pretrained(
            tmp, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _clip_text_config(hidden: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=hidden, intermediate_size=2 * hidden,
        layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=2, pad_token_id=1,
        vocab_size=1000, hidden_act="gelu", projection_dim=projection_dim or hidden,
    )


def _sd_vae(channels: tuple[int, int], latent_channels: int = 4, groups: int = 2, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=list(channels), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=latent_channels, norm_num_groups=groups, **extra,
    )


def _sd_scheduler(family: str):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if family == "sd2":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             prediction_type="v_prediction")
    if family == "sd-turbo":
        return EulerDiscreteScheduler(**common, timestep_spacing="trailing")
    if family == "sdxl":
        return EulerDiscreteScheduler(**common, steps_offset=1, timestep_spacing="leading")
    if family == "sdxl-turbo":
        return EulerAncestralDiscreteScheduler(**common, timestep_spacing="trailing")
    return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_sd(family: str, size: Size, seed: int = 0):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    width = 8 if size == "tiny" else 32
    linear = family in ("sd2", "sd-turbo")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(width, 2 * width), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=width,
        norm_num_groups=2, attention_head_dim=(2, 4) if linear else 8, use_linear_projection=linear,
    )
    torch.manual_seed(seed)
    vae = _sd_vae((width, 2 * width))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(width))
    return StableDiffusionPipeline(
        unet=unet, scheduler=_sd_scheduler(family), vae=vae, text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )


def build_sdxl(family: str, size: Size, seed: int = 0):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    width = 2 if size == "tiny" else 16
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(width, 2 * width), layers_per_block=2, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    )
    torch.manual_seed(seed)
    vae = _sd_vae((32, 64), groups=32, sample_size=128)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(32, projection_dim=32))
    return StableDiffusionXLPipeline(
        unet=unet, scheduler=_sd_scheduler(family), vae=vae, text_encoder=text_encoder,
        text_encoder_2=text_encoder_2, tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(), force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def build_zimage(size: Size, seed: int = 0):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    dim = 32 if size == "tiny" else 64
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=dim, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16,
        rope_theta=256.0, t_scale=1000.0, axes_dims=[dim // 4, dim // 8, dim // 8], axes_lens=[256, 64, 64],
    )
    with torch.no_grad():
        # Allocated with torch.empty upstream: fill them so the saved weights are finite.
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
        latent_channels=16, norm_num_groups=32, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, vocab_size=300, max_position_embeddings=512,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=build_qwen_tokenizer(),
        transformer=transformer,
    )


def build_tiny_pipeline(family: Family, size: Size = "tiny", seed: int = 0):
    if family in ("sd", "sd2", "sd-turbo"):
        return build_sd(family, size, seed)
    if family in ("sdxl", "sdxl-turbo"):
        return build_sdxl(family, size, seed)
    if family == "zimage":
        return build_zimage(size, seed)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def write_tiny_model(directory: Path, family: Family, size: Size = "tiny", seed: int = 0,
                     safe_serialization: bool = True) -> Path:
    """Build a tiny pipeline of `family` (weights drawn from `seed`) and save it to `directory`.

    `safe_serialization=False` writes pickle-based weights: only for testing that they are refused."""
    pipeline = build_tiny_pipeline(family, size, seed)
    directory = Path(directory)
    pipeline.save_pretrained(directory, safe_serialization=safe_serialization)
    return directory


def write_tiny_lora(path: Path, model_dir: Path, rank: int = 4, seed: int = 0) -> Path:
    """A random LoRA for the UNet of the tiny SD pipeline in `model_dir`, saved as one .safetensors file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    torch.manual_seed(seed)
    # init_lora_weights=False draws both LoRA matrices at random, so the adapter visibly changes images.
    pipeline.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.unet))
    path = Path(path)
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name,
                                              safe_serialization=True)
    return path
