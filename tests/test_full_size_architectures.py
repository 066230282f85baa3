"""The GPU benchmark's full-size architectures are built on the meta device (no memory, no GPU) and
checked against the published parameter counts, and a UNet/DiT forward checks the wiring."""

from __future__ import annotations

import pytest
import torch

from bench.architectures import build_full_size_pipeline

# Published sizes: SD 2.1 UNet 865M, SDXL UNet 2.57B, Z-Image DiT 6.15B, Qwen3-4B about 4.0B.
EXPECTED = {
    "sd-turbo": {"unet": 0.865e9},
    "sdxl": {"unet": 2.567e9},
    "z-image": {"transformer": 6.15e9, "text_encoder": 4.0e9},
}


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_full_size_architecture_matches_published_size(arch):
    with torch.device("meta"):
        pipe = build_full_size_pipeline(arch)
    for component, expected in EXPECTED[arch].items():
        assert parameters(getattr(pipe, component)) == pytest.approx(expected, rel=0.03), component


def test_full_size_unets_take_their_inputs():
    with torch.device("meta"):
        sdxl = build_full_size_pipeline("sdxl")
        bf16 = {"dtype": torch.bfloat16}
        out = sdxl.unet(
            torch.empty(2, 4, 64, 64, **bf16), torch.tensor(999),
            encoder_hidden_states=torch.empty(2, 77, 2048, **bf16),
            added_cond_kwargs={"text_embeds": torch.empty(2, 1280, **bf16), "time_ids": torch.empty(2, 6, **bf16)},
        ).sample
    assert out.shape == (2, 4, 64, 64)
