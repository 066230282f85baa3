"""The models file, where each model's files are, and which pipelines are resident.

```toml
default = "turbo"
[models.turbo]
source = "stabilityai/sdxl-turbo"          # Hub repo id, or a local folder
revision = "<40-hex commit sha>"           # a branch or tag works, with a warning: not reproducible
dtype = "float16"
variant = "fp16"
defaults = { num_inference_steps = 1, guidance_scale = 0.0, width = 512, height = 512 }
limits = { max_pixels = 1048576, max_steps = 8, max_images = 4 }
```

At start every model is *described* from its config files (family, revision, sizes) without loading
weights. Pipelines are loaded on the GPU thread when a batch needs them and kept under a memory budget,
least recently used evicted first.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import time
import tomllib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .samplers import SAMPLERS, Sampler, UnsupportedPipeline, sampler_for

log = logging.getLogger(__name__)

# Only these are ever fetched from the Hub or read: configs, tokenizers and safetensors weights.
ALLOW_PATTERNS = ["*.json", "*.txt", "*.jinja", "*.model", "*.safetensors"]
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


class ModelDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    width: int | None = None  # None: the architecture's native size
    height: int | None = None
    negative_prompt: str | None = None


class ModelLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_pixels: int = 1024 * 1024
    max_steps: int = 100
    max_images: int = 4


class SourceSpec(BaseModel):
    """Where files come from: a local path (starting with . or /) or a Hub repo id pinned by revision."""

    model_config = ConfigDict(extra="forbid")

    source: str
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return self.source.startswith((".", "/"))


class ModelSpec(SourceSpec):
    dtype: str = "float32"
    variant: str | None = None
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    limits: ModelLimits = Field(default_factory=ModelLimits)


class LoraSpec(SourceSpec):
    """A LoRA adapter: a .safetensors file, or a Hub repo (pinned by revision) holding one."""

    weight_name: str | None = None  # the file inside a folder or repo; required when it holds several


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str
    models: dict[str, ModelSpec]
    loras: dict[str, LoraSpec] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "ModelsFile":
        models_file = cls.model_validate(tomllib.loads(Path(path).read_text()))
        base = Path(path).resolve().parent
        for spec in [*models_file.models.values(), *models_file.loras.values()]:
            if spec.is_local:
                spec.source = str((base / spec.source).resolve())
        if models_file.default not in models_file.models:
            raise ValueError(f"default model {models_file.default!r} is not in [models]")
        return models_file


class UnsafeWeights(ValueError):
    """A model whose weights exist only in a pickle-based format."""


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a model, read from its config files without loading it."""

    alias: str
    spec: ModelSpec
    folder: Path
    revision: str
    family: str  # the diffusers pipeline class
    size_multiple: int
    default_size: tuple[int, int]

    @property
    def default_strength(self) -> float:
        return SAMPLERS[self.family].default_strength

    @property
    def default_inpaint_strength(self) -> float:
        return SAMPLERS[self.family].default_inpaint_strength

    @property
    def modes(self) -> frozenset:
        return SAMPLERS[self.family].modes


@dataclass
class LoadedModel:
    info: ModelInfo
    pipeline: object
    sampler: Sampler
    bytes: int
    adapters: set[str] = field(default_factory=set)  # LoRA adapters loaded into this pipeline


def lora_file(name: str, spec: LoraSpec, cache_dir: str | None) -> Path:
    """The adapter's .safetensors file, fetched from the Hub if needed; any other format is refused."""
    if spec.is_local:
        folder_or_file = Path(spec.source)
    else:
        from huggingface_hub import snapshot_download

        pattern = spec.weight_name or "*.safetensors"
        folder_or_file = Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=[pattern],
                                                cache_dir=cache_dir))
    if folder_or_file.is_dir():
        candidates = [folder_or_file / spec.weight_name] if spec.weight_name else sorted(
            folder_or_file.glob("*.safetensors"))
        if len(candidates) != 1:
            raise ValueError(f"LoRA {name}: set weight_name, {folder_or_file} holds {len(candidates)} weight files")
        folder_or_file = candidates[0]
    if folder_or_file.suffix != ".safetensors":
        raise UnsafeWeights(f"LoRA {name}: {folder_or_file.name} is not a .safetensors file")
    if not folder_or_file.exists():
        raise FileNotFoundError(f"LoRA {name}: {folder_or_file} does not exist")
    return folder_or_file


def download(spec: ModelSpec, cache_dir: str | None, local_only: bool = False) -> tuple[Path, str]:
    """A folder holding the spec's files and the revision it is (a commit sha for Hub models)."""
    if spec.is_local:
        return Path(spec.source), spec.revision or "local"
    from huggingface_hub import snapshot_download

    if spec.revision is None or not COMMIT_SHA.match(spec.revision):
        log.warning("model %s is pinned to %r, not a commit sha: its weights can change under you",
                    spec.source, spec.revision or "main")
    folder = Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=ALLOW_PATTERNS,
                                    cache_dir=cache_dir, local_files_only=local_only))
    return folder, folder.name


def check_safetensors_only(folder: Path) -> None:
    """Refuse a pipeline any of whose model components lacks safetensors weights, naming what it has."""
    for config in sorted(folder.glob("*/config.json")):
        component = config.parent
        if "tokenizer" in component.name or "scheduler" in component.name:
            continue
        if not any(component.glob("*.safetensors")):
            pickles = sorted(p.relative_to(folder).as_posix() for p in component.iterdir()
                             if p.name.endswith(PICKLE_SUFFIXES))
            found = f"only pickle-based weights: {', '.join(pickles)}" if pickles else "no weights"
            raise UnsafeWeights(f"{component.name} of {folder} has {found}; diffqueue loads safetensors only")


def describe(alias: str, spec: ModelSpec, folder: Path, revision: str) -> ModelInfo:
    family = json.loads((folder / "model_index.json").read_text())["_class_name"]
    if family not in SAMPLERS:
        raise UnsupportedPipeline(f"model {alias}: {family} is not supported; supported: {', '.join(SAMPLERS)}")
    vae = json.loads((folder / "vae" / "config.json").read_text())
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    size_multiple = SAMPLERS[family].size_multiple_for(vae_scale_factor)
    unet_config = folder / "unet" / "config.json"
    native = json.loads(unet_config.read_text())["sample_size"] * vae_scale_factor if unet_config.exists() else 1024
    default_size = (spec.defaults.width or native, spec.defaults.height or native)
    return ModelInfo(alias, spec, folder, revision, family, size_multiple, default_size)


def load_pipeline(info: ModelInfo, device: str):
    import torch
    from diffusers import DiffusionPipeline

    check_safetensors_only(info.folder)
    pipeline = DiffusionPipeline.from_pretrained(
        info.folder, dtype=getattr(torch, info.spec.dtype), variant=info.spec.variant,
        use_safetensors=True, local_files_only=True,
    )
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_bytes(pipeline) -> int:
    import torch

    modules = [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


class ModelRegistry:
    def __init__(self, models_file: ModelsFile, device: str, memory_budget_bytes: int | None = None,
                 cache_dir: str | None = None) -> None:
        self.models_file = models_file
        self.device = device
        self.memory_budget_bytes = memory_budget_bytes
        self.cache_dir = cache_dir
        self.infos: dict[str, ModelInfo] = {}
        self.lora_files: dict[str, Path] = {}
        self._resident: OrderedDict[str, LoadedModel] = OrderedDict()
        self.evictions = 0
        self.load_seconds: dict[str, float] = {}

    @property
    def default_alias(self) -> str:
        return self.models_file.default

    def prepare(self) -> None:
        """Fetch (or find in the cache) and describe every model; refuse pickle-only ones."""
        for alias, spec in self.models_file.models.items():
            folder, revision = download(spec, self.cache_dir)
            check_safetensors_only(folder)
            self.infos[alias] = describe(alias, spec, folder, revision)
        for name, lora in self.models_file.loras.items():
            self.lora_files[name] = lora_file(name, lora, self.cache_dir)

    def info(self, alias: str) -> ModelInfo | None:
        return self.infos.get(alias)

    def warm(self) -> None:
        """Load every model once (so a broken one fails the start, not a job); the default loads last
        and so stays resident whatever the budget."""
        for alias in [a for a in self.infos if a != self.default_alias] + [self.default_alias]:
            self.get(alias)

    def is_resident(self, alias: str) -> bool:
        return alias in self._resident

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def get(self, alias: str) -> LoadedModel:
        """The loaded pipeline for `alias`, loading it (and evicting others) if needed. GPU thread only."""
        if alias in self._resident:
            self._resident.move_to_end(alias)
            return self._resident[alias]
        info = self.infos[alias]
        started = time.perf_counter()
        pipeline = load_pipeline(info, self.device)
        self.load_seconds[alias] = time.perf_counter() - started
        loaded = LoadedModel(info, pipeline, sampler_for(pipeline), pipeline_bytes(pipeline))
        log.info("loaded model %s (%s, %.0f MB) in %.1fs", alias, info.revision, loaded.bytes / 2**20,
                 self.load_seconds[alias])
        self._resident[alias] = loaded
        self._evict_until_fits(keep=alias)
        return loaded

    def activate_loras(self, model: LoadedModel, loras: tuple[tuple[str, float], ...]) -> None:
        """Give the pipeline exactly this adapter set (loading adapters the first time they are used)."""
        pipeline = model.pipeline
        if not loras:
            if model.adapters:
                pipeline.disable_lora()
            return
        for name, _scale in loras:
            if name not in model.adapters:
                path = self.lora_files[name]
                pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name,
                                           use_safetensors=True)
                model.adapters.add(name)
        pipeline.enable_lora()
        pipeline.set_adapters([name for name, _ in loras], adapter_weights=[scale for _, scale in loras])

    def _over_budget(self) -> bool:
        used = sum(m.bytes for m in self._resident.values())
        return self.memory_budget_bytes is not None and used > self.memory_budget_bytes

    def _evict_until_fits(self, keep: str) -> None:
        while self._over_budget() and len(self._resident) > 1:
            victim = next(a for a in self._resident if a != keep)
            log.info("evicting model %s to stay under the memory budget", victim)
            del self._resident[victim]
            self.evictions += 1
            self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
