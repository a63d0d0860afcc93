"""The content-addressed store shared by blob upload, input staging and output collection."""

from expbuild_worker.storage._cas import BlobWriter, ContentAddressedStore

__all__ = ["BlobWriter", "ContentAddressedStore"]
