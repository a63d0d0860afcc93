"""OutputWriter: outputs land byte-exact under the destination and never anywhere else."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import pytest

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.client import OutputError, OutputWriter


def _digest(data: bytes) -> pb.Digest:
    return pb.Digest(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _chunks(path: str, data: bytes, size: int = 3) -> list[pb.OutputFileChunk]:
    return [
        pb.OutputFileChunk(path=path, offset=i, data=data[i : i + size]) for i in range(0, len(data), size)
    ]


def _result(
    files: Iterable[tuple[str, bytes, bool]] = (),
    *,
    symlinks: Iterable[tuple[str, str]] = (),
    directories: Iterable[str] = (),
) -> pb.ExecutionResult:
    result = pb.ExecutionResult(status=pb.EXECUTION_STATUS_COMPLETED)
    for path, data, executable in files:
        result.output_files.add(path=path, digest=_digest(data), is_executable=executable)
    for path, target in symlinks:
        result.output_symlinks.add(path=path, target=target)
    for d in directories:
        result.output_directories.add(path=d)
    return result


def test_files_directories_symlinks_and_modes_are_materialised(tmp_path: Path) -> None:
    """What the worker collected is rebuilt exactly: bytes, exec bits, empty files and dirs, links."""
    tool = b"#!/bin/sh\necho hi\n"
    blob = bytes(range(256)) * 5
    writer = OutputWriter(destination=tmp_path)
    for chunk in _chunks("out/bin/tool", tool) + _chunks("out/data.bin", blob, 100):
        writer.write(chunk)
    done = writer.finish(
        _result(
            [("out/bin/tool", tool, True), ("out/data.bin", blob, False), ("out/empty", b"", False)],
            symlinks=[("out/link", "data.bin")],
            directories=["out", "out/bin", "out/nothing/here"],
        )
    )
    assert (tmp_path / "out/bin/tool").read_bytes() == tool
    assert (tmp_path / "out/data.bin").read_bytes() == blob
    assert (tmp_path / "out/empty").read_bytes() == b""
    assert stat.S_IMODE((tmp_path / "out/bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out/data.bin").stat().st_mode) == 0o644
    assert os.readlink(tmp_path / "out/link") == "data.bin"
    assert (tmp_path / "out/nothing/here").is_dir()
    assert set(done) == {
        "out",
        "out/bin",
        "out/nothing/here",
        "out/bin/tool",
        "out/data.bin",
        "out/empty",
        "out/link",
    }


@pytest.mark.parametrize(
    "path",
    ["../x", "/etc/passwd", "a/../../x", "a/./b", "a//b", "nul\x00byte", ""],
    ids=["dotdot", "absolute", "nested-dotdot", "dot", "empty-component", "nul", "empty"],
)
def test_unsafe_chunk_paths_are_refused(tmp_path: Path, path: str) -> None:
    """A worker (or a man in the middle) cannot make the client write outside the destination."""
    dest = tmp_path / "dest"
    dest.mkdir()
    writer = OutputWriter(destination=dest)
    with pytest.raises(OutputError, match="normalised relative path"):
        writer.write(pb.OutputFileChunk(path=path, offset=0, data=b"owned"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dest"]


def test_existing_symlinked_parent_is_not_written_through(tmp_path: Path) -> None:
    """A symlink already in the destination never redirects an output elsewhere."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "out").symlink_to(outside)
    writer = OutputWriter(destination=dest)
    with pytest.raises(OutputError, match="refusing to write through it"):
        writer.write(pb.OutputFileChunk(path="out/x", offset=0, data=b"owned"))
    assert list(outside.iterdir()) == []


def test_existing_symlink_at_output_path_is_replaced_not_followed(tmp_path: Path) -> None:
    """An output replaces a symlink at its path; the file the link pointed to stays untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "result.txt").symlink_to(victim)
    writer = OutputWriter(destination=dest)
    for chunk in _chunks("result.txt", b"new bytes"):
        writer.write(chunk)
    writer.finish(_result([("result.txt", b"new bytes", False)]))
    assert victim.read_bytes() == b"precious"
    assert not (dest / "result.txt").is_symlink()
    assert (dest / "result.txt").read_bytes() == b"new bytes"


def test_corrupted_content_is_detected_and_removed(tmp_path: Path) -> None:
    """Bytes that do not match the manifest digest are an error, and no corrupt file is left."""
    writer = OutputWriter(destination=tmp_path)
    writer.write(pb.OutputFileChunk(path="f", offset=0, data=b"tampered"))
    with pytest.raises(OutputError, match="sha256"):
        writer.finish(_result([("f", b"original", False)]))
    assert not (tmp_path / "f").exists()


def test_gap_between_chunks_is_refused(tmp_path: Path) -> None:
    """Chunks of a file must be contiguous; a gap would shift bytes silently."""
    writer = OutputWriter(destination=tmp_path)
    writer.write(pb.OutputFileChunk(path="f", offset=0, data=b"abc"))
    with pytest.raises(OutputError, match="does not follow byte 3"):
        writer.write(pb.OutputFileChunk(path="f", offset=4, data=b"e"))
    writer.close()


def test_content_not_listed_in_the_result_is_refused(tmp_path: Path) -> None:
    """Only outputs the result vouches for (with a digest) are kept."""
    writer = OutputWriter(destination=tmp_path)
    writer.write(pb.OutputFileChunk(path="stray", offset=0, data=b"x"))
    with pytest.raises(OutputError, match="does not list it"):
        writer.finish(_result([]))
    assert not (tmp_path / "stray").exists()


def test_omitted_contents_are_fetched_and_verified(tmp_path: Path) -> None:
    """With omit_output_contents the manifest alone drives the download, verified all the same."""
    data = b"fetched later" * 1000
    store = {hashlib.sha256(data).hexdigest(): data}

    def read_blob(digest: pb.Digest) -> Iterable[bytes]:
        blob = store[digest.sha256]
        return [blob[i : i + 4096] for i in range(0, len(blob), 4096)]

    writer = OutputWriter(destination=tmp_path)
    writer.finish(_result([("dir/big", data, True)]), read_blob=read_blob)
    assert (tmp_path / "dir/big").read_bytes() == data
    assert os.access(tmp_path / "dir/big", os.X_OK)


def test_missing_contents_without_a_reader_is_an_error(tmp_path: Path) -> None:
    """A listed non-empty file that never arrived is reported, not left empty."""
    writer = OutputWriter(destination=tmp_path)
    with pytest.raises(OutputError, match="no content received"):
        writer.finish(_result([("f", b"data", False)]))
    assert not (tmp_path / "f").exists()


def test_directory_in_the_way_is_an_error(tmp_path: Path) -> None:
    """An output never deletes a local directory to make room for itself."""
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "keep").write_bytes(b"keep")
    writer = OutputWriter(destination=tmp_path)
    with pytest.raises(OutputError, match="directory is in the way"):
        writer.write(pb.OutputFileChunk(path="f", offset=0, data=b"x"))
    assert (tmp_path / "f" / "keep").read_bytes() == b"keep"
