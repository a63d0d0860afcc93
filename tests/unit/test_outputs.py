"""Output collection: results that fit one message, each output once, OS errors as data."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from expbuild_worker.engine._outputs import MAX_NAMED_PROBLEMS, collect_outputs
from expbuild_worker.errors import OutputLimitExceeded, ResourceExhaustedError
from expbuild_worker.frontdoors.worker_v1._translate import event_to_pb
from expbuild_worker.model import (
    ActionResult,
    Digest,
    ExecutionStatus,
    IsolationLevel,
    LogSummary,
    OutputManifest,
    ResourceUsage,
    StageTimes,
)
from expbuild_worker.storage import ContentAddressedStore

CLIENT_DEFAULT_RECEIVE_LIMIT = 4 << 20  # gRPC's default max_receive_message_length
LONG_TARGET = "t" * 4000
DEEP_PREFIX = "/".join(["d" * 250] * 11)  # 2760 bytes, so each entry under it is ~2.8 KB of path


@pytest.fixture
def store(tmp_path: Path) -> ContentAddressedStore:
    return ContentAddressedStore(root=tmp_path / "store", max_bytes=1 << 30)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "action"
    path.mkdir()
    return path


def collect(
    root: Path, store: Any, *, files: tuple[str, ...] = (), dirs: tuple[str, ...] = (), **kw: Any
) -> Any:
    return collect_outputs(
        root,
        output_files=files,
        output_directories=dirs,
        store=store,
        max_bytes=kw.pop("max_bytes", 1 << 30),
        **kw,
    )


def result_bytes(manifest: OutputManifest) -> int:
    """The size of the ExecuteResponse carrying ``manifest``, as the gRPC front door sends it."""
    result = ActionResult(
        execution_id="e" * 64,
        status=ExecutionStatus.COMPLETED,
        message="",
        exit_code=0,
        signal=None,
        outputs=manifest,
        stdout=LogSummary(0, 0),
        stderr=LogSummary(0, 0),
        usage=ResourceUsage(),
        times=StageTimes(),
        executor="host",
        isolation=IsolationLevel.HOST,
    )
    return event_to_pb(result).ByteSize()


# ---- a result fits one message ------------------------------------------------------------------


def _symlinks(root: Path, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    (root / "out").mkdir()
    for i in range(count):
        os.symlink(LONG_TARGET, root / "out" / str(i))
    return (), ("out",)


def _deep_files(root: Path, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    (root / DEEP_PREFIX).mkdir(parents=True)
    for i in range(count):
        (root / DEEP_PREFIX / str(i)).write_bytes(b"")
    return (), (DEEP_PREFIX.split("/")[0],)


def _deep_directories(root: Path, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    for i in range(count):
        (root / DEEP_PREFIX / str(i)).mkdir(parents=True)
    return (), (DEEP_PREFIX.split("/")[0],)


SHAPES = pytest.mark.parametrize(
    ("make", "entry_bytes"),
    [(_symlinks, 4010), (_deep_files, 2850), (_deep_directories, 2770)],
    ids=["symlinks-with-4KB-targets", "files-with-long-paths", "directories-with-long-paths"],
)


@SHAPES
def test_outputs_that_would_break_a_default_client_are_an_output_limit(
    root: Path, store: ContentAddressedStore, make: Any, entry_bytes: int
) -> None:
    """Entries whose paths, targets and digests add up past 4 MiB would end the stream with
    RESOURCE_EXHAUSTED at a default client; they are refused as an output limit instead."""
    files, dirs = make(root, CLIENT_DEFAULT_RECEIVE_LIMIT // entry_bytes + 10)
    with pytest.raises(OutputLimitExceeded, match="pack large trees into one file"):
        collect(root, store, files=files, dirs=dirs)


@SHAPES
def test_outputs_collection_accepts_fit_a_default_client(
    root: Path, store: ContentAddressedStore, make: Any, entry_bytes: int
) -> None:
    """A result of ~2.5 MiB of entries is delivered whole, and its message stays under 4 MiB."""
    count = (5 << 19) // entry_bytes
    files, dirs = make(root, count)
    manifest = collect(root, store, files=files, dirs=dirs)
    assert len(manifest.files) + len(manifest.symlinks) + len(manifest.directories) >= count
    assert result_bytes(manifest) < CLIENT_DEFAULT_RECEIVE_LIMIT


# ---- each output once ---------------------------------------------------------------------------


def test_overlapping_outputs_are_listed_and_counted_once(root: Path, store: ContentAddressedStore) -> None:
    """A file named twice and a directory inside another listed one hold 3.5 KB, under a 4 KB cap:
    counting them twice would refuse outputs that fit."""
    (root / "out/sub").mkdir(parents=True)
    (root / "out/f").write_bytes(b"f" * 2500)
    (root / "out/sub/g").write_bytes(b"g" * 1000)
    os.symlink("g", root / "out/sub/link")
    manifest = collect(
        root, store, files=("out/f", "out/f", "out/sub/g"), dirs=("out/sub", "out", "out/sub"), max_bytes=4000
    )
    assert [f.path for f in manifest.files] == ["out/f", "out/sub/g"]
    assert [s.path for s in manifest.symlinks] == ["out/sub/link"]
    assert manifest.directories == ("out", "out/sub")
    assert manifest.files[0].digest == Digest.of_bytes(b"f" * 2500)


def test_hard_links_to_one_file_count_its_bytes_once(root: Path, store: ContentAddressedStore) -> None:
    """Two names of one 3 KB inode take 3 KB of disk, so a 4 KB cap holds both, with one digest."""
    (root / "out").mkdir()
    (root / "out/a").write_bytes(b"x" * 3000)
    os.link(root / "out/a", root / "out/b")
    manifest = collect(root, store, dirs=("out",), max_bytes=4000)
    assert [f.path for f in manifest.files] == ["out/a", "out/b"]
    assert manifest.files[0].digest == manifest.files[1].digest == Digest.of_bytes(b"x" * 3000)
    assert b"".join(store.open_blob(manifest.files[1].digest)) == b"x" * 3000


def test_distinct_files_still_count_toward_the_byte_cap(root: Path, store: ContentAddressedStore) -> None:
    """Counting once is not counting less: two different 3 KB files exceed a 4 KB cap."""
    (root / "out").mkdir()
    (root / "out/a").write_bytes(b"a" * 3000)
    (root / "out/b").write_bytes(b"b" * 3000)
    with pytest.raises(OutputLimitExceeded, match="max_output_bytes"):
        collect(root, store, files=("out/a",), dirs=("out",), max_bytes=4000)


# ---- OS errors are data --------------------------------------------------------------------------


class FailingStore:
    """The real store, except that taking in a file whose name is in ``fail`` raises ``error``."""

    def __init__(self, store: ContentAddressedStore, fail: set[str], error: BaseException) -> None:
        self.store, self.fail, self.error = store, fail, error
        self.pins: list[object] = []

    def adopt_file(self, name: str, *, dir_fd: int, **kw: Any) -> Digest:
        if "pin" in kw:
            self.pins.append(kw["pin"])
        if name in self.fail:
            raise self.error
        return self.store.adopt_file(name, dir_fd=dir_fd)


def test_a_missing_action_root_is_an_empty_manifest_with_a_problem(
    tmp_path: Path, store: ContentAddressedStore
) -> None:
    """An action that deleted its own directory still gets its result (and exit code), not INTERNAL."""
    manifest = collect(tmp_path / "gone", store, files=("a",), dirs=("d",))
    assert manifest.files == () and manifest.directories == ()
    assert len(manifest.problems) == 1 and manifest.problems[0].startswith(".: ")


def test_missing_outputs_are_simply_absent(root: Path, store: ContentAddressedStore) -> None:
    """An output the command did not make is no problem: it is just not in the result."""
    (root / "present").write_bytes(b"here")
    (root / "file").write_bytes(b"not a directory")
    manifest = collect(root, store, files=("absent", "no/such/dir/f", "file/below", "present"), dirs=("d",))
    assert [f.path for f in manifest.files] == ["present"]
    assert manifest.problems == ()


@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EACCES, errno.EIO], ids=["disk-full", "permission-denied", "io-error"]
)
def test_an_output_that_cannot_be_stored_is_named_and_the_rest_arrive(
    root: Path, store: ContentAddressedStore, code: int
) -> None:
    """One unreadable output costs only that output: it is named with its reason, the others arrive."""
    (root / "out").mkdir()
    for name in ("a", "b", "c"):
        (root / "out" / name).write_bytes(name.encode())
    failing = FailingStore(store, {"b"}, OSError(code, os.strerror(code), "/somewhere/private"))
    manifest = collect(root, failing, dirs=("out",))
    assert [f.path for f in manifest.files] == ["out/a", "out/c"]
    assert manifest.problems == (f"out/b: {os.strerror(code)}",)


def test_an_unreadable_directory_is_named_not_reported_empty(
    root: Path, store: ContentAddressedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory that cannot be listed is named as a problem and left out, rather than claimed
    empty; its siblings arrive."""
    (root / "out/locked").mkdir(parents=True)
    (root / "out/locked/secret").write_bytes(b"s")
    (root / "out/open").write_bytes(b"o")
    real_listdir = os.listdir

    def listdir(fd: Any) -> list[str]:
        if isinstance(fd, int) and os.readlink(f"/proc/self/fd/{fd}").endswith("/locked"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_listdir(fd)

    monkeypatch.setattr(os, "listdir", listdir)
    manifest = collect(root, store, dirs=("out",))
    assert manifest.directories == ("out",)
    assert [f.path for f in manifest.files] == ["out/open"]
    assert manifest.problems == ("out/locked: Permission denied",)


def test_an_action_tree_removed_during_collection_is_no_error(
    root: Path, store: ContentAddressedStore
) -> None:
    """A tree deleted while it is collected (a process left behind, say) leaves what was taken
    and ends the collection quietly."""
    (root / "out/a").mkdir(parents=True)
    for name in ("1", "2", "3"):
        (root / "out/a" / name).write_bytes(name.encode())

    class RemovingStore:
        def adopt_file(self, name: str, *, dir_fd: int, **kw: Any) -> Digest:
            digest = store.adopt_file(name, dir_fd=dir_fd)
            shutil.rmtree(root)
            return digest

    manifest = collect(root, RemovingStore(), files=("later",), dirs=("out",))
    assert [f.path for f in manifest.files] == ["out/a/1"]
    assert manifest.problems == ()


def test_problems_are_bounded(root: Path, store: ContentAddressedStore) -> None:
    """Thousands of failures cannot bloat a result: the first few are named, the rest counted."""
    (root / "out").mkdir()
    names = {f"f{i:02}" for i in range(25)}
    for name in names:
        (root / "out" / name).write_bytes(b"x")
    manifest = collect(root, FailingStore(store, names, OSError(errno.EIO, "I/O error")), dirs=("out",))
    assert len(manifest.problems) == MAX_NAMED_PROBLEMS + 1
    assert manifest.problems[0] == "out/f00: I/O error"
    assert manifest.problems[-1] == f"and {25 - MAX_NAMED_PROBLEMS} more outputs could not be collected"


def test_a_full_store_still_ends_collection(root: Path, store: ContentAddressedStore) -> None:
    """A store that is full is the worker's resource limit, not one output's problem: it propagates."""
    (root / "f").write_bytes(b"x")
    with pytest.raises(ResourceExhaustedError):
        collect(root, FailingStore(store, {"f"}, ResourceExhaustedError("store full")), files=("f",))


def test_the_pin_reaches_the_store_with_every_file(root: Path, store: ContentAddressedStore) -> None:
    """Outputs are taken in under the action's pin, so none is evicted before its result is read."""
    (root / "out").mkdir()
    (root / "out/a").write_bytes(b"a")
    (root / "out/b").write_bytes(b"b")
    pin = object()
    recording = FailingStore(store, set(), OSError())
    manifest = collect(root, recording, dirs=("out",), pin=pin)
    assert len(manifest.files) == 2 and recording.pins == [pin, pin]
