"""The Docker executor's pure parts, without a daemon: log demux, the container spec, archives."""

from __future__ import annotations

import io
import os
import struct
import tarfile
from pathlib import Path

import pytest

from expbuild_worker.config import DockerExecutorConfig
from expbuild_worker.errors import PreconditionError
from expbuild_worker.execution.docker._archive import (
    UnsafeArchiveError,
    clear_output,
    pack_root,
    unpack_output,
)
from expbuild_worker.execution.docker._attach import MAX_CHUNK, Demultiplexer, rechunk
from expbuild_worker.execution.docker._spec import Hardening, container_body, network_mode_for
from expbuild_worker.execution.executor import Command
from expbuild_worker.model import LogStream, ResourceLimits

# ---- log demultiplexing ------------------------------------------------------------------------


def _frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(data)) + data


def test_demux_reassembles_frames_split_at_every_byte() -> None:
    """However the daemon's bytes are split, each stream's bytes come out whole and in order."""
    wire = _frame(1, b"hello ") + _frame(2, b"oops") + _frame(1, b"world") + _frame(1, b"") + _frame(2, b"!")
    for cut in range(len(wire) + 1):
        demux = Demultiplexer()
        pieces = demux.feed(wire[:cut]) + demux.feed(wire[cut:])
        out = b"".join(d for s, d in pieces if s is LogStream.STDOUT)
        err = b"".join(d for s, d in pieces if s is LogStream.STDERR)
        assert (out, err) == (b"hello world", b"oops!")
        assert not demux.pending


def test_demux_flags_a_stream_cut_inside_a_frame() -> None:
    """A connection that breaks mid-frame is detectable, so the loss is reported rather than hidden."""
    demux = Demultiplexer()
    demux.feed(_frame(1, b"abcdef")[:10])
    assert demux.pending


def test_rechunk_merges_neighbours_and_caps_chunk_size() -> None:
    """Small writes are batched; no chunk exceeds 64 KiB; interleaving order is kept."""
    from collections import deque

    pieces = deque(
        [(LogStream.STDOUT, b"a" * 40_000), (LogStream.STDOUT, b"b" * 40_000), (LogStream.STDERR, b"e")]
    )
    chunks = rechunk(pieces)
    assert [s for s, _ in chunks] == [LogStream.STDOUT, LogStream.STDOUT, LogStream.STDERR]
    assert len(chunks[0][1]) == MAX_CHUNK and all(len(d) <= MAX_CHUNK for _, d in chunks)
    assert b"".join(d for s, d in chunks if s is LogStream.STDOUT) == b"a" * 40_000 + b"b" * 40_000


# ---- the container spec --------------------------------------------------------------------------


def _command(tmp_path: Path, **kwargs: object) -> Command:
    fields: dict[str, object] = {
        "execution_id": "e1",
        "argv": ["make", "-j2"],
        "environment": {"A": "1"},
        "root": tmp_path,
        "working_directory": "src/lib",
        "stdin": b"",
        "limits": ResourceLimits(cpu_cores=1.5, memory_bytes=64 << 20, max_processes=100),
    }
    fields.update(kwargs)
    return Command(**fields)  # type: ignore[arg-type]


def test_spec_hardens_by_default_and_sets_every_limit(tmp_path: Path) -> None:
    """The default container is read-only, capability-less, non-root, init-reaped, swap-capped and limited."""
    body = container_body(
        image="img:1",
        command=_command(tmp_path),
        hardening=Hardening.from_config(DockerExecutorConfig()),
        network_mode="none",
        labels={"k": "v"},
        io_mode="bind",
        cgroup_parent="/expbuild/w/t",
    )
    host = body["HostConfig"]
    assert body["Entrypoint"] == ["make"] and body["Cmd"] == ["-j2"]
    assert body["Env"] == ["A=1"] and body["User"] == "65534:65534"
    assert body["WorkingDir"] == "/work/src/lib"
    assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"] and host["Init"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Tmpfs"]["/tmp"].startswith("rw,exec,")
    assert host["Memory"] == host["MemorySwap"] == 64 << 20
    assert host["NanoCpus"] == 1_500_000_000 and host["PidsLimit"] == 101, "the init is not the command's"
    roomy = container_body(
        image="img:1",
        command=_command(tmp_path),
        hardening=Hardening.from_config(DockerExecutorConfig()),
        network_mode="none",
        labels={},
        io_mode="bind",
        cgroup_parent="/expbuild/w/t",
        pids_room=16,
    )
    assert roomy["HostConfig"]["PidsLimit"] == 117, "room for the runtime's init until the exact limit is set"
    assert host["NetworkMode"] == "none" and host["CgroupParent"] == "/expbuild/w/t"
    assert host["Mounts"] == [{"Type": "bind", "Source": str(tmp_path), "Target": "/work", "ReadOnly": False}]
    assert not body["OpenStdin"]


def test_spec_for_archive_io_uses_a_volume_and_opens_stdin_when_given(tmp_path: Path) -> None:
    """Remote daemons get a fresh volume (get_archive cannot see a tmpfs) and stdin when there is some."""
    body = container_body(
        image="img:1",
        command=_command(tmp_path, stdin=b"x", working_directory=""),
        hardening=Hardening.from_config(DockerExecutorConfig(runtime="runsc")),
        network_mode="none",
        labels={},
        io_mode="archive",
        cgroup_parent=None,
    )
    assert body["HostConfig"]["Mounts"] == [{"Type": "volume", "Target": "/work"}]
    assert body["WorkingDir"] == "/work/root"
    assert body["OpenStdin"] and body["StdinOnce"] and body["AttachStdin"]
    assert body["HostConfig"]["PidsLimit"] > 100, "gVisor's own threads need room"
    assert "CgroupParent" not in body["HostConfig"]


def test_network_is_granted_only_when_a_mode_is_configured() -> None:
    """network=True gets the configured mode or is refused naming limits.network; False/None stay off."""
    default = Hardening.from_config(DockerExecutorConfig())
    assert network_mode_for(ResourceLimits(network=None), default, executor="d") == "none"
    assert network_mode_for(ResourceLimits(network=False), default, executor="d") == "none"
    granted = Hardening.from_config(DockerExecutorConfig(network_mode_when_enabled="bridge"))
    assert network_mode_for(ResourceLimits(network=True), granted, executor="d") == "bridge"
    with pytest.raises(PreconditionError, match=r"limits\.network"):
        network_mode_for(ResourceLimits(network=True), default, executor="d")


# ---- archives ------------------------------------------------------------------------------------


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> list[bytes]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return [raw[i : i + 1000] for i in range(0, len(raw), 1000)]


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    return info


def test_unpack_keeps_modes_nesting_and_symlinks(tmp_path: Path) -> None:
    """An output directory comes back with nested files, the exec bit and symlinks left as symlinks."""
    chunks = _tar(
        (_info("out", tarfile.DIRTYPE, 0o755), None),
        (_info("out/a/b.txt"), b"nested"),
        (_info("out/tool", mode=0o755), b"#!/bin/sh\n"),
        (_info("out/leak", tarfile.SYMTYPE, link="/etc/shadow"), None),
        (_info("out/again", tarfile.LNKTYPE, link="out/tool"), None),
    )
    unpack_output(chunks, root=tmp_path, output_path="out")
    assert (tmp_path / "out/a/b.txt").read_bytes() == b"nested"
    assert os.stat(tmp_path / "out/tool").st_mode & 0o111
    assert os.readlink(tmp_path / "out/leak") == "/etc/shadow"
    assert (tmp_path / "out/again").read_bytes() == b"#!/bin/sh\n"


@pytest.mark.parametrize(
    "name", ["other", "out/../../escape", "/etc/cron.d/x"], ids=["sibling", "dotdot", "absolute"]
)
def test_unpack_refuses_members_outside_the_output(tmp_path: Path, name: str) -> None:
    """A member that is not under the requested output is refused, and nothing is written outside."""
    chunks = _tar((_info(name), b"x"))
    with pytest.raises(UnsafeArchiveError):
        unpack_output(chunks, root=tmp_path / "root", output_path="out")
    assert not (tmp_path / "escape").exists()


def test_unpack_never_writes_through_a_symlinked_parent(tmp_path: Path) -> None:
    """If a parent on the host is a symlink (out -> elsewhere), extraction refuses instead of following it."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "d").symlink_to(elsewhere)
    with pytest.raises(UnsafeArchiveError):
        unpack_output(_tar((_info("f"), b"x")), root=root, output_path="d/f")
    assert not clear_output(root, "d/f")
    assert os.listdir(elsewhere) == []


def test_pack_root_gives_directories_to_the_command_user_and_keeps_links(tmp_path: Path) -> None:
    """Packed directories belong to the command's user; files keep their owner; symlinks stay symlinks."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/f").write_bytes(b"data")
    (tmp_path / "link").symlink_to("sub/f")
    with (
        pack_root(tmp_path, arcname="root", dir_owner=(4242, 4243)) as spool,
        tarfile.open(fileobj=spool) as tar,
    ):
        members = {m.name: m for m in tar.getmembers()}
    assert (members["root"].uid, members["root/sub"].gid) == (4242, 4243)
    assert members["root/sub/f"].uid == os.getuid()
    assert members["root/link"].issym() and members["root/link"].linkname == "sub/f"


def test_the_own_api_asks_for_a_recycled_container_by_field_or_property() -> None:
    """recycle_runner on the wire, or the REAPI-style platform property, reaches the engine's action."""
    from expbuild_worker.api.v1 import worker_pb2 as pb
    from expbuild_worker.frontdoors.worker_v1._translate import action_from_pb

    by_field = action_from_pb(pb.ExecuteRequest(argv=["true"], recycle_runner=True))
    by_property = action_from_pb(
        pb.ExecuteRequest(argv=["true"], platform_properties={"recycle-runner": "true"})
    )
    plain = action_from_pb(pb.ExecuteRequest(argv=["true"]))
    assert by_field.recycle_runner and by_property.recycle_runner and not plain.recycle_runner
