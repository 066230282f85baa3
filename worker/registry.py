"""The models file and the pipelines loaded from it.

```toml
default = "turbo"
[models.turbo]
source = "stabilityai/sdxl-turbo"          # Hub repo id, or a local folder
revision = "71153311d3dbb46851df1931d3ca6e939de83304"
dtype = "float16"
variant = "fp16"
defaults = { num_inference_steps = 1, guidance_scale = 0.0, width = 512, height = 512 }
limits = { max_pixels = 1048576, max_steps = 8, max_images = 4 }
```
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .samplers import Sampler, sampler_for

log = logging.getLogger(__name__)

# Only these are ever fetched from the Hub: configs, tokenizers and safetensors weights.
ALLOW_PATTERNS = ["*.json", "*.txt", "*.jinja", "*.model", "*.safetensors"]


class ModelDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    width: int | None = None  # None: the pipeline's own default size
    height: int | None = None
    negative_prompt: str | None = None


class ModelLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_pixels: int = 1024 * 1024
    max_steps: int = 100
    max_images: int = 4


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    revision: str | None = None
    dtype: str = "float32"
    variant: str | None = None
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    limits: ModelLimits = Field(default_factory=ModelLimits)


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str
    models: dict[str, ModelSpec]

    @classmethod
    def load(cls, path: Path) -> "ModelsFile":
        models_file = cls.model_validate(tomllib.loads(Path(path).read_text()))
        base = Path(path).resolve().parent
        for spec in models_file.models.values():
            if spec.source.startswith((".", "/")):
                spec.source = str((base / spec.source).resolve())
        if models_file.default not in models_file.models:
            raise ValueError(f"default model {models_file.default!r} is not in [models]")
        return models_file


@dataclass
class LoadedModel:
    alias: str
    spec: ModelSpec
    revision: str
    pipeline: object
    sampler: Sampler

    @property
    def default_size(self) -> tuple[int, int]:
        pipe = self.pipeline
        if hasattr(pipe, "unet"):
            side = pipe.unet.config.sample_size * pipe.vae_scale_factor
            return self.spec.defaults.width or side, self.spec.defaults.height or side
        return self.spec.defaults.width or 1024, self.spec.defaults.height or 1024


def resolve_source(spec: ModelSpec) -> tuple[Path, str]:
    """A local folder for the spec's weights and the revision they are: a Hub snapshot or a local path."""
    local = Path(spec.source)
    if local.is_dir():
        return local, spec.revision or "local"
    from huggingface_hub import snapshot_download

    folder = snapshot_download(spec.source, revision=spec.revision, allow_patterns=ALLOW_PATTERNS)
    return Path(folder), Path(folder).name


def load_pipeline(spec: ModelSpec, device: str):
    import torch
    from diffusers import DiffusionPipeline

    folder, revision = resolve_source(spec)
    pipeline = DiffusionPipeline.from_pretrained(
        folder,
        dtype=getattr(torch, spec.dtype),
        variant=spec.variant,
        use_safetensors=True,
        local_files_only=True,
    )
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, revision


class ModelRegistry:
    def __init__(self, models_file: ModelsFile, device: str) -> None:
        self.models_file = models_file
        self.device = device
        self._loaded: dict[str, LoadedModel] = {}

    @property
    def default_alias(self) -> str:
        return self.models_file.default

    def spec(self, alias: str) -> ModelSpec | None:
        return self.models_file.models.get(alias)

    def warm(self) -> None:
        for alias in self.models_file.models:
            self.get(alias)

    def get(self, alias: str) -> LoadedModel:
        if alias not in self._loaded:
            spec = self.models_file.models[alias]
            log.info("loading model %s from %s", alias, spec.source)
            pipeline, revision = load_pipeline(spec, self.device)
            self._loaded[alias] = LoadedModel(alias, spec, revision, pipeline, sampler_for(pipeline))
        return self._loaded[alias]
