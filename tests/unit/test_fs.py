"""Removing action trees: any depth, never through a symlink, and honest about what stayed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from expbuild_worker.engine._workdirs import ActionDirectories
from expbuild_worker.fs import remove_tree


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


def test_what_cannot_be_removed_is_reported_and_left(tmp_path: Path) -> None:
    """A directory whose entries cannot be unlinked (here: read-only for a non-root worker, or
    made immutable-like by removing the parent's write bit) leaves the tree and says so."""
    tree = tmp_path / "tree"
    (tree / "locked").mkdir(parents=True)
    (tree / "locked" / "f").write_text("x")
    (tree / "gone").write_text("y")
    os.chmod(tree / "locked", 0o500)
    try:
        removed = remove_tree(tree)
        if os.geteuid() == 0:  # root may unlink anywhere
            assert removed and not tree.exists()
        else:
            assert not removed
            assert (tree / "locked" / "f").exists() and not (tree / "gone").exists()
    finally:
        if (tree / "locked").exists():
            os.chmod(tree / "locked", 0o700)


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
