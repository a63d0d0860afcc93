"""Local inputs: which remote paths they get, how directories and symlinks travel, what is refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.client import InputSpec, collect_inputs, parse_input_spec
from expbuild_worker.errors import InvalidRequestError
from expbuild_worker.model import Digest


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "remote"),
    [
        ("src/main.c", "src/main.c"),
        ("./src//main.c", "src/main.c"),
        ("src/main.c:build/in.c", "build/in.c"),
        (".", ""),
        ("src:.", ""),
        ("../outside/tool", "tool"),
    ],
    ids=["relative", "unnormalised", "explicit", "dot-is-root", "explicit-root", "dotdot-basename"],
)
def test_remote_defaults(in_tmp: Path, spec: str, remote: str) -> None:
    """REMOTE defaults to LOCAL's relative path, or its base name when that would escape."""
    assert parse_input_spec(spec).remote == remote


def test_absolute_local_defaults_to_basename(tmp_path: Path) -> None:
    """An absolute LOCAL says nothing about the remote layout, so only its name is kept."""
    assert parse_input_spec(str(tmp_path / "data.txt")).remote == "data.txt"


def test_existing_name_with_colon_is_all_local(in_tmp: Path) -> None:
    """A local file whose name contains ':' is not split into LOCAL:REMOTE."""
    (in_tmp / "a:b").write_bytes(b"x")
    spec = parse_input_spec("a:b")
    assert spec == InputSpec(Path("a:b"), "a:b")


@pytest.mark.parametrize("remote", ["../x", "/etc/passwd", "a/../../x"], ids=["dotdot", "absolute", "nested"])
def test_escaping_remote_is_refused(remote: str) -> None:
    """A REMOTE path that leaves the action root is refused before anything is sent."""
    with pytest.raises(InvalidRequestError, match="REMOTE"):
        parse_input_spec(f"local:{remote}")


def test_directory_walk(tmp_path: Path) -> None:
    """A directory travels whole: files with digests and exec bits, empty dirs, in-tree links."""
    src = tmp_path / "src"
    (src / "sub" / "empty").mkdir(parents=True)
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "sub" / "data").write_bytes(b"data")
    (src / "blank").write_bytes(b"")
    (src / "alias").symlink_to("sub/data")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"outside")
    (src / "ext").symlink_to(outside)

    tree = collect_inputs([InputSpec(src, "in")])
    files = {f.remote: f for f in tree.files}
    assert set(files) == {"in/blank", "in/run.sh", "in/sub/data", "in/ext"}
    assert files["in/run.sh"].is_executable and not files["in/sub/data"].is_executable
    assert files["in/sub/data"].digest == Digest(hashlib.sha256(b"data").hexdigest(), 4)
    assert files["in/ext"].digest == Digest.of_file(outside)
    assert tree.directories == ("in", "in/sub", "in/sub/empty")
    assert tree.symlinks == (("in/alias", "sub/data"),)

    request = pb.ExecuteRequest()
    tree.add_to(request)
    by_path = {f.path: f for f in request.input_files}
    assert by_path["in/blank"].WhichOneof("source") == "content"
    assert by_path["in/sub/data"].digest.sha256 == hashlib.sha256(b"data").hexdigest()
    assert set(tree.blobs()) == {files[p].digest for p in ("in/run.sh", "in/sub/data", "in/ext")}


def test_symlink_out_of_the_input_to_a_directory_is_refused(tmp_path: Path) -> None:
    """Following a link to a directory outside could upload far more than asked; refuse it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "up").symlink_to(tmp_path)
    with pytest.raises(InvalidRequestError, match="up"):
        collect_inputs([InputSpec(src, "src")])


def test_dangling_symlink_is_refused(tmp_path: Path) -> None:
    """A link to nothing cannot be uploaded; the error names it."""
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("/nonexistent/target", src / "dangling")
    with pytest.raises(InvalidRequestError, match="dangling"):
        collect_inputs([InputSpec(src, "src")])


def test_two_inputs_on_one_remote_path_are_refused(tmp_path: Path) -> None:
    """Two local files cannot silently overwrite each other remotely."""
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    with pytest.raises(InvalidRequestError, match="already taken"):
        collect_inputs([InputSpec(tmp_path / "a", "x"), InputSpec(tmp_path / "b", "x")])


def test_missing_input_is_refused(tmp_path: Path) -> None:
    """A typo in --input fails before contacting the worker, naming the path."""
    with pytest.raises(InvalidRequestError, match="nope"):
        collect_inputs([InputSpec(tmp_path / "nope", "nope")])


def test_same_content_is_one_blob(tmp_path: Path) -> None:
    """Identical files are uploaded once: blobs are content-addressed."""
    (tmp_path / "a").write_bytes(b"same")
    (tmp_path / "b").write_bytes(b"same")
    tree = collect_inputs([InputSpec(tmp_path / "a", "a"), InputSpec(tmp_path / "b", "b")])
    assert len(tree.files) == 2
    assert len(tree.blobs()) == 1
