"""An exclusive claim on a worker's directory for its lifetime, taken before anything in it is touched."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from expbuild_worker.errors import UnavailableError

LOCK_FILE = ".expbuild-worker.lock"


class DirectoryLock:
    """Holds ``flock(LOCK_EX)`` on ``<directory>/.expbuild-worker.lock`` until ``release``.

    Start-up clean-up (leftover action directories, half-written blobs) deletes things, so it
    may only run once this worker has proven that no other live worker uses the directory. A
    kernel lock dies with its process, so a worker killed with SIGKILL never leaves a stale
    claim behind; the holder's pid is written into the file only to name it in the refusal.
    Locks conflict between open files, so two workers in one process are kept apart too.
    """

    def __init__(self, directory: Path, *, what: str, config_key: str, shown: str | None = None) -> None:
        """``what`` and ``shown`` (default: the directory) name the claim in a refusal."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UnavailableError(f"cannot lock {what} {shown or directory}: {err.strerror}") from err
            by = f" (pid {holder})" if holder else ""
            advice = f"give each worker its own {config_key}"
            if config_key != "server.worker_id":
                advice += " (or its own server.worker_id with the default)"
            name = shown if shown is not None else str(directory)
            raise UnavailableError(f"{what} {name} is in use by another worker{by}; {advice}") from err
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.directory = directory
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the claim up (idempotent). The file stays: removing it would race a new claimant."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
