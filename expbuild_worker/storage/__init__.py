"""The content-addressed store shared by blob upload, input staging and output collection."""

from expbuild_worker.storage._action_cache import ActionCache
from expbuild_worker.storage._cas import BlobWriter, ContentAddressedStore, StorePin
from expbuild_worker.storage._protocol import BlobPin, BlobStore
from expbuild_worker.storage._remote import RemoteCas, RemotePin, RemoteStore

__all__ = [
    "ActionCache",
    "BlobPin",
    "BlobStore",
    "BlobWriter",
    "ContentAddressedStore",
    "RemoteCas",
    "RemotePin",
    "RemoteStore",
    "StorePin",
]
