"""expbuild-worker: runs build actions in host processes or hardened containers, over gRPC."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("expbuild-worker")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
