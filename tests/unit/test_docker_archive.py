"""Unpacking a daemon's archive of an output stops at the cap and leaves nothing partial behind."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from expbuild_worker.errors import OutputLimitExceeded
from expbuild_worker.execution.docker._archive import distinct_outputs, unpack_output

BLOCK = 1 << 16


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    """One tar member (header and padded data), as a daemon streams it."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data)
    padding = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * padding


class DaemonStream:
    """A daemon's archive stream, like docker-py's generator: ``head`` then, lazily, a member of
    ``claimed`` bytes of zeros (a sparse file as the daemon sends it). Records how much of the
    data was read and whether the stream was closed."""

    def __init__(self, head: bytes, *, big: str = "", claimed: int = 0) -> None:
        self.head, self.big, self.claimed = head, big, claimed
        self.sent = 0
        self.closed = False
        self._chunks = self._generate()

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        self.closed = True
        self._chunks.close()

    def _generate(self) -> Iterator[bytes]:
        yield self.head
        self.sent += len(self.head)
        if self.big:
            info = tarfile.TarInfo(self.big)
            info.size = self.claimed
            yield info.tobuf(tarfile.PAX_FORMAT)
            left = self.claimed
            while left > 0:
                block = b"\0" * min(BLOCK, left)
                yield block
                self.sent += len(block)
                left -= len(block)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)


def unpack(stream: DaemonStream, root: Path, output: str, max_bytes: int | None) -> int:
    return unpack_output(stream, root=root, output_path=output, max_bytes=max_bytes)


def test_a_member_past_the_cap_is_refused_from_its_header(tmp_path: Path) -> None:
    """A terabyte (a sparse file, say) under a 1 MiB cap is refused before any of it is read or
    written, the stream is closed, and the files unpacked before it are removed."""
    head = _member("out", kind=tarfile.DIRTYPE) + _member("out/small", b"s" * 1000)
    stream = DaemonStream(head, big="out/huge", claimed=1 << 40)
    with pytest.raises(OutputLimitExceeded, match="max_output_bytes"):
        unpack(stream, tmp_path, "out", max_bytes=1 << 20)
    assert stream.sent <= len(head) + 2 * BLOCK
    assert stream.closed
    assert os.listdir(tmp_path) == []


def test_files_that_add_up_past_the_cap_are_refused(tmp_path: Path) -> None:
    """The cap holds for the output as a whole: three 400 KB files exceed 1 MiB, and none stays."""
    data = b"x" * 400_000
    head = _member("d", kind=tarfile.DIRTYPE) + b"".join(_member(f"d/{i}", data) for i in range(3))
    with pytest.raises(OutputLimitExceeded):
        unpack(DaemonStream(head), tmp_path, "sub/d", max_bytes=1 << 20)
    assert os.listdir(tmp_path / "sub") == []


def test_an_output_within_the_cap_arrives_with_its_size(tmp_path: Path) -> None:
    """Under the cap everything arrives; a hard link adds no bytes (one inode on disk), so an
    output of 600 KB with a second name fits 1 MiB."""
    data = b"y" * 600_000
    head = (
        _member("out", kind=tarfile.DIRTYPE)
        + _member("out/a", data)
        + _member("out/b", kind=tarfile.LNKTYPE, link="out/a")
    )
    written = unpack(DaemonStream(head), tmp_path, "out", max_bytes=1 << 20)
    assert written == len(data)
    assert (tmp_path / "out/b").read_bytes() == data
    assert os.stat(tmp_path / "out/a").st_ino == os.stat(tmp_path / "out/b").st_ino


def test_exactly_at_the_cap_is_allowed(tmp_path: Path) -> None:
    """The cap is inclusive: an output of exactly max_bytes is delivered."""
    written = unpack(DaemonStream(_member("f", b"z" * 4096)), tmp_path, "f", max_bytes=4096)
    assert written == 4096 and (tmp_path / "f").read_bytes() == b"z" * 4096


def test_without_a_cap_large_members_are_unpacked(tmp_path: Path) -> None:
    """Callers that have no cap keep the old behaviour: everything is unpacked."""
    stream = DaemonStream(b"", big="f", claimed=3 * BLOCK)
    assert unpack(stream, tmp_path, "f", max_bytes=None) == 3 * BLOCK
    assert os.path.getsize(tmp_path / "f") == 3 * BLOCK


def test_a_broken_stream_leaves_nothing_partial(tmp_path: Path) -> None:
    """A daemon that dies mid-archive leaves no half-written output for collection to report."""

    def chunks() -> Iterator[bytes]:
        yield _member("out", kind=tarfile.DIRTYPE) + _member("out/a", b"a" * 100)
        info = tarfile.TarInfo("out/b")
        info.size = 10 * BLOCK
        yield info.tobuf(tarfile.PAX_FORMAT) + b"b" * BLOCK
        raise ConnectionError("daemon went away")

    with pytest.raises(ConnectionError):
        unpack_output(chunks(), root=tmp_path, output_path="out", max_bytes=None)
    assert os.listdir(tmp_path) == []


def test_overlapping_outputs_are_copied_once() -> None:
    """An output inside another (or named twice) is in the outer one's archive already; copying it
    again would count its bytes twice against the cap."""
    paths = ["out/sub", "out", "single", "out/sub/f", "single", "outer", "a/b", "a/c"]
    assert distinct_outputs(paths) == ["a/b", "a/c", "out", "outer", "single"]
