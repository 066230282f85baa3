"""Images on Azure Blob Storage (Azurite + the real azure-storage-blob SDK)."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
from azure.storage.blob import BlobServiceClient
from PIL import Image

from tests.helpers import WorkerProcess, wait_for, wait_result


@pytest.fixture(scope="module")
def azure_worker(redis_server, models_file, webhook_secret, azurite, tmp_path_factory):
    process = WorkerProcess(
        redis_server.url, models_file, tmp_path_factory.mktemp("unused"), webhook_secret,
        DIFFQUEUE_STORAGE_URL="azure://generated/team-a", AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string,
        DIFFQUEUE_IMAGE_QUALITY="80",
    )
    yield process.start()
    process.stop()


@pytest.fixture
def blobs(azurite):
    return BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client("generated")


@pytest.mark.parametrize("output_format, content_type, pil_format", [
    ("png", "image/png", "PNG"), ("webp", "image/webp", "WEBP"), ("jpeg", "image/jpeg", "JPEG")])
def test_image_lands_in_the_container_and_its_url_downloads_it(
    azure_worker, celery_sender, blobs, output_format, content_type, pil_format
):
    request = {"prompt": "a blue door", "seed": 8, "num_images": 2, "output_format": output_format}
    job_id = azure_worker.send(celery_sender, request)
    result = wait_result(celery_sender, job_id)
    assert result["status"] == "succeeded", result

    extension = {"png": "png", "webp": "webp", "jpeg": "jpg"}[output_format]
    for index, image in enumerate(result["images"]):
        blob = blobs.get_blob_client(f"team-a/{job_id}/{index}.{extension}")
        properties = blob.get_blob_properties()
        assert properties.content_settings.content_type == content_type == image["content_type"]
        assert properties.metadata == {"job_id": job_id, "seed": str(8 + index), "model": "sd", "revision": "local"}
        stored = blob.download_blob().readall()
        assert image["url_expires_at"] is not None and "sig=" in image["url"]
        downloaded = httpx.get(image["url"])
        assert downloaded.status_code == 200 and downloaded.content == stored
        assert Image.open(io.BytesIO(stored)).format == pil_format
    if output_format == "png":
        parameters = json.loads(Image.open(io.BytesIO(stored)).text["parameters"])
        assert parameters["seed"] == 9 and parameters["prompt"] == "a blue door"


def test_sas_url_is_read_only(azure_worker, celery_sender):
    result = wait_result(celery_sender, azure_worker.send(celery_sender, {"prompt": "x", "seed": 1}))
    url = result["images"][0]["url"]
    response = httpx.put(url, content=b"overwritten", headers={"x-ms-blob-type": "BlockBlob"})
    assert response.status_code == 403


def test_store_creates_the_container_overwrites_and_can_give_public_urls(azurite):
    from diffqueue.worker.storage.azure import AzureBlobStore

    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    store = AzureBlobStore(service, "fresh-container", public_urls=True)
    first = store.put("job/0.png", b"one", "image/png", {"job_id": "job"})
    second = store.put("job/0.png", b"two", "image/png", {"job_id": "job"})
    assert first.url == second.url and first.expires_at is None and "sig=" not in first.url
    names = [b.name for b in service.get_container_client("fresh-container").list_blobs()]
    assert names == ["job/0.png"]
    assert service.get_container_client("fresh-container").download_blob("job/0.png").readall() == b"two"


def storage_and_worker(redis_server, models_file, webhook_secret, tmp_path, **env):
    """A private Azurite (stoppable) and a worker storing into it with the SDK's retries kept short."""
    from tests.helpers import Azurite

    storage = Azurite(tmp_path / "azurite").start()
    worker = WorkerProcess(
        redis_server.url, models_file, tmp_path / "unused", webhook_secret,
        DIFFQUEUE_STORAGE_URL="azure://outage", AZURE_STORAGE_CONNECTION_STRING=storage.connection_string,
        DIFFQUEUE_AZURE_RETRY_TOTAL="1", DIFFQUEUE_AZURE_RETRY_BACKOFF_S="0.1", **env,
    ).start()
    return storage, worker


def test_upload_that_keeps_failing_fails_the_job_with_a_storage_error(
    redis_server, models_file, webhook_secret, tmp_path, celery_sender
):
    outage, worker = storage_and_worker(redis_server, models_file, webhook_secret, tmp_path,
                                        DIFFQUEUE_STORAGE_RETRY_HORIZON_S="3")
    try:
        outage.stop()
        result = wait_result(celery_sender, worker.send(celery_sender, {"prompt": "x", "seed": 1}))
        assert result["status"] == "failed" and result["error"]["code"] == "storage_error"
        assert "outage" in result["error"]["message"]
        assert worker.process.poll() is None
    finally:
        worker.stop()


def test_storage_outage_then_recovery_completes_the_job(
    redis_server, models_file, webhook_secret, tmp_path, celery_sender
):
    storage, worker = storage_and_worker(redis_server, models_file, webhook_secret, tmp_path)
    try:
        storage.stop()
        job_id = worker.send(celery_sender, {"prompt": "waits for storage", "seed": 3})
        wait_for(lambda: "retrying" in worker.log_tail(500), timeout=60)
        down_for = time.monotonic()
        storage.start()  # same port, same data folder
        result = wait_result(celery_sender, job_id, timeout=120)
        assert result["status"] == "succeeded", result
        assert httpx.get(result["images"][0]["url"]).status_code == 200
        assert time.monotonic() - down_for < 60
    finally:
        worker.stop()
        storage.stop()
