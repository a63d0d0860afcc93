"""Filesystem steps inside an action directory that never follow a symlink out of it."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import overload


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


@overload
def directories(root: Path) -> list[Path]: ...
@overload
def directories(root: Path, *, limit: int) -> list[Path] | None: ...
def directories(root: Path, *, limit: int | None = None) -> list[Path] | None:
    """``root`` and every directory below it, never entering a symlink; None when more than
    ``limit`` entries would have to be looked at.

    For handing a freshly staged tree to the command's user, before the command runs (nothing
    moves meanwhile, so a walk by path is enough). The other walks keep their own loops for
    what they add: ``remove_tree`` works at any depth with two descriptors, output collection
    builds a capped manifest by descriptors, the disk watcher stats every entry on one file
    system while the command changes the tree, and cgroups are removed deepest first.
    """
    found = [root]
    pending = [root]
    seen = 0
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                seen += 1
                if limit is not None and seen > limit:
                    return None
                if entry.is_dir(follow_symlinks=False):
                    found.append(Path(entry.path))
                    pending.append(Path(entry.path))
    return found


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
            if stat.S_ISDIR(os.stat(path.name, dir_fd=parent, follow_symlinks=False).st_mode):
                return _remove_directory(parent, path.name)
            os.unlink(path.name, dir_fd=parent)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True
    finally:
        os.close(parent)


def _remove_directory(parent: int, name: str) -> bool:
    fd = _open_writable_directory(parent, name)
    if fd is None:
        return not _exists(parent, name)
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
                child = _open_writable_directory(fd, child_name)
                if child is None:
                    ok = ok and not _exists(fd, child_name)
                    continue
                os.close(fd)
                fd = child
                levels.append(_Level(_identity(fd), child_name))
                continue
            levels.pop()
            if not levels:
                break
            try:
                up = os.open("..", _DIRECTORY, dir_fd=fd)
            except OSError:
                return False
            os.close(fd)
            fd = up
            if _identity(fd) != levels[-1].ident:
                return False  # moved while we worked: stop rather than remove elsewhere
            ok = _rmdir(fd, level.name) and ok
    finally:
        os.close(fd)
    return _rmdir(parent, name) and ok


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _open_writable_directory(parent: int, name: str) -> int | None:
    """Open directory ``name`` of ``parent`` (never through a symlink) so that its entries can be
    removed: a directory the command made read-only, or unreadable (a build's read-only trees),
    is given back to its owner first. None when it is gone or cannot be opened."""
    try:
        fd = os.open(name, _DIRECTORY, dir_fd=parent)
    except FileNotFoundError:
        return None
    except PermissionError:
        if not _make_owner_writable(parent, name):
            return None
        try:
            fd = os.open(name, _DIRECTORY, dir_fd=parent)
        except OSError:
            return None
    except OSError:
        return None
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o700 != 0o700:
            os.fchmod(fd, stat.S_IMODE(mode) | 0o700)
    except OSError:
        pass  # not ours to change: removing its entries will say whether it mattered
    return fd


def _make_owner_writable(parent: int, name: str) -> bool:
    """chmod u+rwx a directory that cannot be opened, through an O_PATH descriptor (chmod by name
    would follow a symlink swapped in meanwhile)."""
    try:
        handle = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    except OSError:
        return False
    try:
        os.chmod(f"/proc/self/fd/{handle}", 0o700)
    except OSError:
        return False
    finally:
        os.close(handle)
    return True


def _exists(parent: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


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
