"""Walking and removing action trees: any depth, never through a symlink, and honest about what stayed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from expbuild_worker.engine._workdirs import ActionDirectories
from expbuild_worker.fs import directories, remove_tree


def deep_tree(top: Path, depth: int) -> None:
    """``top/d/d/.../d`` ``depth`` levels deep, a file at the bottom (made by descriptor: the path
    is far longer than the kernel takes in one piece)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(os.open("bottom", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)


def test_a_tree_deeper_than_any_recursion_or_descriptor_limit_is_removed(tmp_path: Path) -> None:
    deep_tree(tmp_path / "deep", 3000)
    assert remove_tree(tmp_path / "deep")
    assert list(tmp_path.iterdir()) == []


def test_symlinks_are_removed_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "file").write_text("x")
    (tree / "a" / "b" / "to-dir").symlink_to(outside)
    (tree / "a" / "to-file").symlink_to(outside / "keep")
    (tree / "a" / "dangling").symlink_to(tmp_path / "nowhere")
    for i in range(50):
        (tree / f"wide-{i}").mkdir()
        (tree / f"wide-{i}" / "f").write_text("y")
    assert remove_tree(tree)
    assert not tree.exists()
    assert (outside / "keep").read_text() == "kept"


def test_a_file_a_symlink_and_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    assert remove_tree(tmp_path / "file") and remove_tree(tmp_path / "link")
    assert remove_tree(tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []


NOBODY = 65534


def as_nobody(work: Callable[[], bool]) -> bool:
    """Run ``work`` in a forked child that became user and group nobody; its answer."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os._exit(0 if work() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"the child failed ({code})"
    return code == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_read_only_trees_are_removed_and_what_is_not_ours_is_reported(tmp_path: Path) -> None:
    """As an unprivileged worker: directories the command made read-only, unlistable or
    untraversable (a build's read-only trees) are made writable again and removed; a directory
    owned by someone else cannot be, so the removal says False and leaves only that."""
    top = Path(tempfile.mkdtemp(dir="/tmp"))  # a pytest tmp_path is not reachable by another user
    try:
        os.chmod(top, 0o755)
        tree = top / "tree"
        for mode, name in ((0o555, "ro"), (0o400, "no-x"), (0o000, "none"), (0o300, "no-r")):
            (tree / name / "sub").mkdir(parents=True)
            (tree / name / "sub" / "f").write_text("x")
            (tree / name / "f").write_text("x")
            os.chmod(tree / name / "sub", mode)
            os.chmod(tree / name, mode)
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(top)], check=True)
        (tree / "foreign").mkdir(mode=0o755)
        (tree / "foreign" / "f").write_text("root's")  # owned by root: nobody may not remove it
        assert as_nobody(lambda: remove_tree(tree)) is False
        assert sorted(p.name for p in tree.iterdir()) == ["foreign"]
        assert (tree / "foreign" / "f").read_text() == "root's"
    finally:
        assert remove_tree(top)


def test_a_previous_run_s_deep_leftover_does_not_stop_the_next_start(tmp_path: Path) -> None:
    """A worker killed while removing a deep action tree comes back: start clears it."""
    actions = tmp_path / "actions"
    actions.mkdir()
    deep_tree(actions / "left-behind", 3000)
    directories = ActionDirectories(root=actions)
    asyncio.run(directories.start())
    entries = list(actions.iterdir())
    assert entries and all(not any(e.iterdir()) for e in entries)  # only the fresh, empty spares
    asyncio.run(directories.close())
    assert list(actions.iterdir()) == []


def test_directories_lists_real_directories_only_and_stops_at_the_limit(tmp_path: Path) -> None:
    """A staged tree is handed over directory by directory: a symlink to a directory is never
    entered (it may point out of the tree), and a large tree is reported as such, not walked."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"x")
    (tmp_path / "outside" / "secret").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path / "outside")
    assert sorted(directories(root)) == [root, root / "a", root / "a" / "b"]
    assert directories(root, limit=2) is None
    assert directories(root, limit=4) is not None
