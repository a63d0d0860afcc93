"""Filesystem steps inside an action directory that never follow a symlink out of it."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def make_dirs(root: Path, rel: str) -> Path:
    """Create ``root/rel`` one component at a time and return it.

    Raises NotADirectoryError when a component exists but is not a real directory (a symlink
    is never passed through) and ValueError for a '.' or '..' component.
    """
    current = root
    for part in [p for p in rel.split("/") if p]:
        if part in (".", ".."):
            raise ValueError(f"path component {part!r} in {rel!r} is not allowed")
        current = current / part
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                raise NotADirectoryError(
                    f"{current.relative_to(root)} is not a directory (a symlink is never followed)"
                ) from None
    return current
