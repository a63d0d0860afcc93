"""The content-addressed store shared by blob upload, input staging and output collection."""

from expbuild_worker.storage._cas import BlobWriter, ContentAddressedStore, StorePin
from expbuild_worker.storage._protocol import BlobPin, BlobStore

__all__ = ["BlobPin", "BlobStore", "BlobWriter", "ContentAddressedStore", "StorePin"]
