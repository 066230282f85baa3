"""diffqueue's producer SDK: the job contract and a client. Light: no torch, no worker code."""

from .client import Client, JobNotFound, JobTimeout, queue_list_names
from .models import (
    CONTRACT_VERSION,
    DEFAULT_QUEUE,
    TASK_NAME,
    ErrorInfo,
    GenerationRequest,
    ImageInfo,
    JobResult,
    JobState,
    LoraRef,
    Mode,
    OutputFormat,
    Timings,
    WebhookPayload,
)
from .settings import QueueSettings

__all__ = [
    "CONTRACT_VERSION",
    "DEFAULT_QUEUE",
    "TASK_NAME",
    "Client",
    "ErrorInfo",
    "GenerationRequest",
    "ImageInfo",
    "JobNotFound",
    "JobResult",
    "JobState",
    "JobTimeout",
    "LoraRef",
    "Mode",
    "OutputFormat",
    "QueueSettings",
    "Timings",
    "WebhookPayload",
    "queue_list_names",
]
