"""Worker configuration, from DIFFQUEUE_* environment variables or CLI flags."""

from __future__ import annotations

from pathlib import Path

from diffqueue.producer.settings import QueueSettings
from pydantic import Field, SecretStr


class WorkerSettings(QueueSettings):
    models_file: Path = Path("models.toml")
    storage_url: str = "file://./outputs"  # or azure://container[/prefix]
    azure_account_url: str | None = None  # with DefaultAzureCredential when no connection string is set
    azure_create_container: bool = True
    azure_public_urls: bool = False  # True: plain blob URLs (public container); False: read-only SAS URLs
    azure_sas_ttl_s: int = 7 * 24 * 3600
    azure_retry_total: int = 5
    azure_retry_backoff_s: float = 1.0
    storage_retry_horizon_s: float = 600.0  # keep retrying a failed upload this long before failing the job
    image_quality: int = Field(default=90, ge=1, le=100)  # webp and jpeg
    png_parameters: bool = True  # write the generation parameters into PNG text chunks
    webhook_secret: SecretStr | None = None
    device: str = "auto"  # auto = cuda when available, else cpu
    hf_cache_dir: str | None = None  # default: huggingface_hub's (HF_HUB_CACHE / HF_HOME); mount a volume here
    model_memory_budget_mb: float | None = None  # resident pipelines; default 80% of GPU memory, 50% of RAM
    max_model_wait_s: float = Field(default=30.0, ge=0)  # longest a job waits behind jobs of resident models

    max_batch: int = Field(default=8, ge=1)  # images per denoising loop
    max_batch_pixels: int = Field(default=8 * 1024 * 1024, ge=1)  # sum of width*height over a batch
    max_wait_ms: int = Field(default=0, ge=0)  # wait this long for a batch to fill; 0 = never wait
    concurrency: int | None = Field(default=None, ge=1)  # Celery threads; default 2 * max_batch

    max_input_bytes: int = 20 * 2**20  # img2img input images
    allow_private_urls: bool = Field(default=False, validation_alias="DIFFQUEUE_ALLOW_PRIVATE_CALLBACKS")
    url_allow_list: list[str] = Field(default_factory=list)  # hosts allowed even when private

    max_deliveries: int = Field(default=3, ge=1)  # a job delivered more often than this is poison: failed
    fault_oom_above_batch: int | None = None  # testing only: raise CUDA's OOM error above this batch size
    fault_crash_on_prompt: str | None = None  # testing only: the process dies abruptly on this prompt

    metrics_host: str = "127.0.0.1"  # the container sets 0.0.0.0
    metrics_port: int | None = None  # /metrics, /livez, /readyz; None = no HTTP server
    liveness_max_batch_s: float = 900.0  # a batch running longer than this makes /livez fail

    webhook_timeout_s: float = 15.0
    webhook_retry_horizon_s: float = 3600.0
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_s: float = 600.0
    webhook_poll_s: float = 0.5
    webhook_lease_s: float = 60.0  # a delivery claimed by a worker that died is retried after this

    @property
    def celery_concurrency(self) -> int:
        return self.concurrency or 2 * self.max_batch

    def memory_budget_bytes(self, device: str) -> int:
        if self.model_memory_budget_mb is not None:
            return int(self.model_memory_budget_mb * 2**20)
        if device.startswith("cuda"):
            import torch

            return int(0.8 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
        import os

        return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
