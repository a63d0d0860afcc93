"""Checks that a path the worker names stays a normalised relative path."""

from __future__ import annotations


def is_safe_relative_path(path: str) -> bool:
    """True when ``path`` is relative, normalised and free of NUL and ``..`` (the API's path rule)."""
    if not path or "\x00" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))
