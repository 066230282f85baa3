"""`azure://CONTAINER[/prefix]`: Azure Blob Storage through azure-storage-blob.

Credentials: `AZURE_STORAGE_CONNECTION_STRING`, or `DIFFQUEUE_AZURE_ACCOUNT_URL` with
`DefaultAzureCredential` (managed identity on Azure Container Apps). Result URLs are read-only SAS
URLs (signed with the account key, or a user-delegation key under Entra ID), or plain URLs when the
container is public.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, ContentSettings, generate_blob_sas

from .base import StorageError, StoredImage

log = logging.getLogger(__name__)


class AzureBlobStore:
    def __init__(
        self,
        service: BlobServiceClient,
        container: str,
        prefix: str = "",
        create_container: bool = True,
        public_urls: bool = False,
        sas_ttl: timedelta = timedelta(days=7),
    ) -> None:
        self.service = service
        self.container = service.get_container_client(container)
        self.prefix = prefix.strip("/")
        self.public_urls = public_urls
        self.sas_ttl = sas_ttl
        self.create_container = create_container
        if create_container:
            try:
                self._ensure_container()
            except AzureError as error:  # storage down at start: uploads will retry, the worker still starts
                log.warning("cannot reach blob container %s yet: %s", container, type(error).__name__)

    @classmethod
    def from_settings(cls, container: str, prefix: str, settings) -> "AzureBlobStore":
        retry = {"retry_total": settings.azure_retry_total, "retry_backoff_factor": settings.azure_retry_backoff_s}
        connection_string = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if connection_string:
            service = BlobServiceClient.from_connection_string(connection_string, **retry)
        elif settings.azure_account_url:
            from azure.identity import DefaultAzureCredential

            service = BlobServiceClient(settings.azure_account_url, credential=DefaultAzureCredential(), **retry)
        else:
            raise ValueError("azure:// storage needs AZURE_STORAGE_CONNECTION_STRING or DIFFQUEUE_AZURE_ACCOUNT_URL")
        return cls(service, container, prefix, settings.azure_create_container, settings.azure_public_urls,
                   timedelta(seconds=settings.azure_sas_ttl_s))

    def _ensure_container(self) -> None:
        try:
            self.container.create_container()
            log.info("created blob container %s", self.container.container_name)
        except ResourceExistsError:
            pass

    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> StoredImage:
        blob_path = f"{self.prefix}/{name}" if self.prefix else name
        blob = self.container.get_blob_client(blob_path)
        try:
            try:
                self._upload(blob, data, content_type, metadata)
            except ResourceNotFoundError:
                if not self.create_container:
                    raise
                self._ensure_container()
                self._upload(blob, data, content_type, metadata)
            return self._readable_url(blob.url, blob_path)
        except AzureError as error:
            raise StorageError(f"upload of {blob_path} to container {self.container.container_name} failed: "
                               f"{type(error).__name__}: {error.message if hasattr(error, 'message') else error}"
                               ) from error

    @staticmethod
    def _upload(blob, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        blob.upload_blob(data, overwrite=True, metadata=metadata, content_settings=ContentSettings(content_type=content_type))

    def _readable_url(self, url: str, blob_path: str) -> StoredImage:
        if self.public_urls:
            return StoredImage(url)
        start = datetime.now(timezone.utc) - timedelta(minutes=5)  # tolerate clock skew
        expiry = start + timedelta(minutes=5) + self.sas_ttl
        signing = {"account_key": self.service.credential.account_key} if self._has_account_key() else {
            "user_delegation_key": self.service.get_user_delegation_key(start, expiry)}
        sas = generate_blob_sas(
            account_name=self.service.account_name, container_name=self.container.container_name,
            blob_name=blob_path, permission=BlobSasPermissions(read=True), start=start, expiry=expiry, **signing,
        )
        return StoredImage(f"{url}?{sas}", expires_at=expiry)

    def _has_account_key(self) -> bool:
        return getattr(self.service.credential, "account_key", None) is not None
