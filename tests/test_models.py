"""Model loading: pinned Hub revisions from a local Hub-layout cache, safetensors only, several models."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffqueue.worker.registry import ModelRegistry, ModelsFile, UnsafeWeights
from diffqueue.worker.tiny_models import write_tiny_model
from safetensors.torch import load_file

from tests.helpers import WorkerProcess, read_image, wait_result

SHA_V1 = "1" * 40
SHA_V2 = "2" * 40


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A cache laid out like huggingface_hub's: two commits of acme/tiny-sd with different weights."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / "models--acme--tiny-sd"
    for sha, seed in ((SHA_V1, 1), (SHA_V2, 2)):
        write_tiny_model(repo / "snapshots" / sha, "sd", seed=seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA_V2)
    return cache


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, as a fresh process would see it: huggingface_hub reads it once, at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def models_file(tmp_path: Path, body: str) -> ModelsFile:
    path = tmp_path / "models.toml"
    path.write_text(body)
    return ModelsFile.load(path)


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_each_pinned_revision_loads_its_own_weights_offline(hub_cache, tmp_path, offline, caplog):
    config = models_file(tmp_path, f"""
default = "v1"
[models.v1]
source = "acme/tiny-sd"
revision = "{SHA_V1}"
[models.v2]
source = "acme/tiny-sd"
revision = "{SHA_V2}"
[models.latest]
source = "acme/tiny-sd"
revision = "main"
""")
    registry = ModelRegistry(config, "cpu", cache_dir=str(hub_cache))
    with caplog.at_level(logging.WARNING):
        registry.prepare()
    assert {alias: info.revision for alias, info in registry.infos.items()} == {
        "v1": SHA_V1, "v2": SHA_V2, "latest": SHA_V2}
    assert "not a commit sha" in caplog.text and "'main'" in caplog.text

    snapshots = hub_cache / "models--acme--tiny-sd" / "snapshots"
    for alias, sha in (("v1", SHA_V1), ("v2", SHA_V2)):
        loaded = registry.get(alias).pipeline.unet.state_dict()
        for name, tensor in unet_weights(snapshots / sha).items():
            assert torch.equal(loaded[name], tensor), (alias, name)
    first = next(iter(unet_weights(snapshots / SHA_V1)))
    assert not torch.equal(unet_weights(snapshots / SHA_V1)[first], unet_weights(snapshots / SHA_V2)[first])


def test_a_revision_missing_from_the_cache_fails_offline_without_network(hub_cache, tmp_path, offline):
    config = models_file(tmp_path, f'default = "x"\n[models.x]\nsource = "acme/tiny-sd"\nrevision = "{"3" * 40}"\n')
    with pytest.raises(Exception, match="(?i)cannot find|offline|not.*found"):
        ModelRegistry(config, "cpu", cache_dir=str(hub_cache)).prepare()


def booby_trapped_pickle(marker: Path) -> bytes:
    """A protocol-0 pickle that calls open(marker, "w") when unpickled: proof that nothing unpickles it."""
    return f"cbuiltins\nopen\n(V{marker}\nVw\ntR.".encode()


def test_pickle_only_model_is_refused_and_never_unpickled(tmp_path):
    folder = write_tiny_model(tmp_path / "pickled", "sd", safe_serialization=False)
    marker = tmp_path / "unpickled.marker"
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(booby_trapped_pickle(marker))
    assert not list((folder / "unet").glob("*.safetensors"))  # transformers writes safetensors regardless
    config = models_file(tmp_path, f'default = "p"\n[models.p]\nsource = "{folder}"\n')

    with pytest.raises(UnsafeWeights, match=r"only pickle-based weights: .*\.bin"):
        ModelRegistry(config, "cpu").prepare()
    assert not marker.exists()


def test_models_list_and_pull_cli(hub_cache, tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(f'default = "v1"\n[models.v1]\nsource = "acme/tiny-sd"\nrevision = "{SHA_V1}"\n'
                    f'[models.gone]\nsource = "acme/tiny-sd"\nrevision = "{"4" * 40}"\n')
    env = {"DIFFQUEUE_MODELS_FILE": str(path), "DIFFQUEUE_HF_CACHE_DIR": str(hub_cache), "HF_HUB_OFFLINE": "1",
           "PATH": ""}
    listed = subprocess.run([sys.executable, "-m", "diffqueue.cli", "models", "list"], env=env,
                            capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line for line in listed.splitlines()[1:]}
    assert "StableDiffusionPipeline" in rows["v1"] and "cached" in rows["v1"] and SHA_V1 in rows["v1"]
    assert "missing" in rows["gone"]
    pulled = subprocess.run([sys.executable, "-m", "diffqueue.cli", "models", "pull"], env=env,
                            capture_output=True, text=True)
    assert pulled.returncode == 1 and "v1" in pulled.stdout and "gone" in pulled.stderr


def test_two_models_alternating_under_a_budget_for_one(
    redis_server, tiny_model_dirs, webhook_secret, tmp_path, celery_sender
):
    path = tmp_path / "two-models.toml"
    path.write_text(
        f'default = "sd"\n[models.sd]\nsource = "{tiny_model_dirs["sd"]}"\n'
        'defaults = { num_inference_steps = 3, width = 64, height = 64 }\n'
        f'[models.zimage]\nsource = "{tiny_model_dirs["zimage"]}"\n'
        'defaults = { num_inference_steps = 3, guidance_scale = 0.0, width = 64, height = 64 }\n'
    )
    worker = WorkerProcess(redis_server.url, path, tmp_path / "images", webhook_secret,
                           DIFFQUEUE_MODEL_MEMORY_BUDGET_MB="4.2", DIFFQUEUE_MAX_MODEL_WAIT_S="1.0",
                           DIFFQUEUE_MAX_BATCH="2").start()
    try:
        ids = [worker.send(celery_sender, {"prompt": f"job {i}", "seed": i, "model": ["sd", "zimage"][i % 2]})
               for i in range(12)]
        results = [wait_result(celery_sender, job_id, timeout=180) for job_id in ids]
        assert all(r["status"] == "succeeded" for r in results), results
        assert [r["model"] for r in results] == ["sd", "zimage"] * 6
        assert max(r["timings"]["queued"] for r in results) < 30, "a job waited without bound"
        evictions = worker.log_tail(2000).count("evicting model")
        assert evictions >= 2, worker.log_tail(80)
        # Preferring the resident model keeps swaps well below one per job.
        assert evictions < len(ids) - 1
        assert read_image(results[0]["images"][0]["url"])[1].shape == (64, 64, 3)
    finally:
        assert worker.stop() == 0


def test_lora_from_a_pinned_hub_revision_and_pickle_loras_refused(hub_cache, tmp_path, offline, tiny_lora):
    from diffqueue.worker.registry import LoraSpec, lora_file

    snapshot = hub_cache / "models--acme--style-lora" / "snapshots" / SHA_V1
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_lora, snapshot / "style.safetensors")
    pinned = LoraSpec(source="acme/style-lora", revision=SHA_V1)
    assert lora_file("style", pinned, str(hub_cache)) == snapshot / "style.safetensors"

    pickled = tmp_path / "style.bin"
    pickled.write_bytes(booby_trapped_pickle(tmp_path / "lora.marker"))
    with pytest.raises(UnsafeWeights, match="not a .safetensors file"):
        lora_file("old", LoraSpec(source=str(pickled)), None)
    assert not (tmp_path / "lora.marker").exists()
