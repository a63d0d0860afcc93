"""Materialise an action's inputs in a fresh private directory."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from expbuild_worker.fs import make_dirs
from expbuild_worker.model import Action
from expbuild_worker.storage import BlobStore


class StagingStopped(Exception):
    """Staging was asked to stop (the action was cancelled or its client went away)."""


def stage_inputs(action: Action, root: Path, store: BlobStore, stop: threading.Event | None = None) -> None:
    """Create directories, files (copied out of the store or written inline) and symlinks.

    Paths were validated (relative, normalised, no file under a file); creating each file
    with O_EXCL|O_NOFOLLOW means an input symlink declared earlier can never redirect a
    later write outside ``root``. Runs on a worker thread: ``stop`` is checked before every
    entry (directory, file, symlink), raising StagingStopped, so a cancelled action stops
    within one file's copy however many entries it declared.
    """

    def check_stop() -> None:
        if stop is not None and stop.is_set():
            raise StagingStopped

    for d in action.input_directories:
        check_stop()
        make_dirs(root, d)
    if action.working_directory:
        make_dirs(root, action.working_directory)
    for f in action.input_files:
        check_stop()
        parent = os.path.dirname(f.path)
        if parent:
            make_dirs(root, parent)
        dest = root / f.path
        if f.digest is not None:
            store.copy_to(f.digest, dest, executable=f.executable)
        else:
            assert f.content is not None
            mode = 0o755 if f.executable else 0o644
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            try:
                view = memoryview(f.content)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.chmod(dest, mode)  # the umask must not strip the execute bit
    for link in action.input_symlinks:
        check_stop()
        parent = os.path.dirname(link.path)
        if parent:
            make_dirs(root, parent)
        os.symlink(link.target, root / link.path)
