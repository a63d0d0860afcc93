"""Filesystem steps inside an action directory that never follow a symlink out of it."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
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


@dataclass
class _Level:
    """A directory being emptied: its identity, its name in its parent, the subdirectories left."""

    ident: tuple[int, int]
    name: str
    subdirs: list[str] | None = None


def remove_tree(path: Path) -> bool:
    """Remove ``path`` (a file, a symlink or a whole directory tree) without following any symlink.

    Works at any depth with two descriptors open (an action can nest directories far deeper than
    a recursive walk, or one descriptor per level, survives) and climbs back through "..", checking
    it is the directory it came from, so a tree moved meanwhile stops the removal instead of
    redirecting it. Returns False when something could not be removed (what is left stays in
    place); a missing ``path`` is success.
    """
    try:
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True
    try:
        try:
            os.unlink(path.name, dir_fd=parent)  # anything but a directory
            return True
        except FileNotFoundError:
            return True
        except IsADirectoryError:
            pass
        return _remove_directory(parent, path.name)
    finally:
        os.close(parent)


def _remove_directory(parent: int, name: str) -> bool:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    ok = True
    levels = [_Level(_identity(fd), name)]
    try:
        while levels:
            level = levels[-1]
            if level.subdirs is None:
                level.subdirs, emptied = _empty_files(fd)
                ok = ok and emptied
            if level.subdirs:
                child_name = level.subdirs.pop()
                try:
                    child = os.open(child_name, flags, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError:
                    ok = False
                    continue
                os.close(fd)
                fd = child
                levels.append(_Level(_identity(fd), child_name))
                continue
            levels.pop()
            if not levels:
                break
            up = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = up
            if _identity(fd) != levels[-1].ident:
                return False  # moved while we worked: stop rather than remove elsewhere
            ok = _rmdir(fd, level.name) and ok
    finally:
        os.close(fd)
    return _rmdir(parent, name) and ok


def _empty_files(fd: int) -> tuple[list[str], bool]:
    """Unlink every entry of directory ``fd`` but its subdirectories; return those and whether all went."""
    subdirs: list[str] = []
    ok = True
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
                continue
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
    return subdirs, ok


def _rmdir(parent: int, name: str) -> bool:
    try:
        os.rmdir(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
