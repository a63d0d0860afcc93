"""A REAPI Action, its Command and input tree, read from the store and turned into an engine Action."""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.errors import InvalidRequestError, MissingBlobsError, NotFoundError, name_some
from expbuild_worker.frontdoors._remote_actions._digests import digest_from_pb
from expbuild_worker.frontdoors._remote_actions._platform import choose
from expbuild_worker.model import Action, Digest, InputFile, InputSymlink
from expbuild_worker.storage import BlobStore

_M = TypeVar("_M", bound=Message)


@dataclass(frozen=True, slots=True)
class LoadedAction:
    """An engine action and what the result needs to speak the client's terms again.

    Output paths in the REAPI are relative to the working directory; in the engine they are
    relative to the input root. ``outputs_from`` maps each engine path back."""

    action: Action
    digest: Digest
    do_not_cache: bool
    working_directory: str
    output_files: tuple[str, ...]
    output_directories: tuple[str, ...]
    output_paths: tuple[str, ...]
    output_directory_format: int

    def client_path(self, engine_path: str) -> str:
        """An engine path (relative to the input root) as the client names it (relative to the
        working directory)."""
        if not self.working_directory:
            return engine_path
        return posixpath.relpath(engine_path, self.working_directory)


def read_action(store: BlobStore, digest: Digest) -> re_pb.Action:
    """The Action message alone (MissingBlobsError when absent). Disk I/O: call on a thread."""
    return _parse(store, digest, re_pb.Action(), "action_digest")


def load_action(
    store: BlobStore, digest: Digest, reapi_action: re_pb.Action, *, max_input_entries: int | None
) -> LoadedAction:
    """Read ``reapi_action``'s Command and input tree; MissingBlobsError lists every blob that
    is needed and absent (as deep as the tree could be read), InvalidRequestError names what is
    malformed. The directories above every output are created before the command runs, as the
    REAPI asks of a worker. Disk I/O: call on a thread."""
    command_digest = digest_from_pb(reapi_action.command_digest, "action.command_digest")
    root_digest = digest_from_pb(reapi_action.input_root_digest, "action.input_root_digest")
    missing = store.find_missing((command_digest, root_digest))
    if missing:
        raise _missing(missing, "the action's command or input root")
    command = _parse(store, command_digest, re_pb.Command(), "action.command_digest")
    if not command.arguments:
        raise InvalidRequestError("command.arguments: must hold at least the program to run")
    tree = _InputTree(store, max_input_entries)
    tree.walk(root_digest)
    working_directory = _normal(command.working_directory, "command.working_directory")

    def under_wd(paths: list[str], field: str) -> tuple[str, ...]:
        out = []
        for i, p in enumerate(paths):
            if not p or p.startswith("/"):
                raise InvalidRequestError(
                    f"{field}[{i}]: {p!r} must be a non-empty path relative to the working directory"
                )
            out.append(_normal(posixpath.join(working_directory, p), f"{field}[{i}]"))
        return tuple(out)

    output_paths = under_wd(list(command.output_paths), "command.output_paths")
    # REAPI 2.1 replaced output_files/output_directories by output_paths: a client sends one form.
    output_files = () if output_paths else under_wd(list(command.output_files), "command.output_files")
    output_dirs = (
        () if output_paths else under_wd(list(command.output_directories), "command.output_directories")
    )
    properties = [(p.name, p.value) for p in reapi_action.platform.properties] or [
        (p.name, p.value) for p in command.platform.properties
    ]
    choice = choose(properties, "action.platform")
    timeout: float | None = None
    if reapi_action.HasField("timeout"):
        if reapi_action.timeout.seconds < 0 or reapi_action.timeout.nanos < 0:
            raise InvalidRequestError("action.timeout: must not be negative")
        timeout = reapi_action.timeout.ToTimedelta().total_seconds() or None
    action = Action(
        execution_id=uuid.uuid4().hex,
        argv=tuple(command.arguments),
        environment={v.name: v.value for v in command.environment_variables},
        working_directory=working_directory,
        input_files=tuple(tree.files),
        input_directories=(
            *tree.directories,
            *_output_parents(tree, output_files, output_dirs, output_paths),
        ),
        input_symlinks=tuple(tree.symlinks),
        output_files=output_files,
        output_directories=output_dirs,
        output_paths=output_paths,
        timeout_seconds=timeout,
        executor=choice.executor,
        image=choice.image,
        platform_properties=dict(properties),
        recycle_runner=choice.recycle_runner,
        retain_outputs=True,
        capture_logs=True,
    )
    return LoadedAction(
        action=action,
        digest=digest,
        do_not_cache=reapi_action.do_not_cache,
        working_directory=working_directory,
        output_files=output_files,
        output_directories=output_dirs,
        output_paths=output_paths,
        output_directory_format=command.output_directory_format,
    )


class _InputTree:
    """The input root walked breadth first: every file, directory and symlink with its full path."""

    def __init__(self, store: BlobStore, max_entries: int | None) -> None:
        self._store = store
        self._max = max_entries
        self.files: list[InputFile] = []
        self.directories: list[str] = []
        self.symlinks: list[InputSymlink] = []
        self._parsed: dict[Digest, re_pb.Directory] = {}

    def walk(self, root: Digest) -> None:
        level: list[tuple[str, Digest]] = [("", root)]
        while level:
            self._read(level)
            following: list[tuple[str, Digest]] = []
            for path, digest in level:
                following.extend(self._entries(path, self._parsed[digest]))
            level = following

    def _read(self, level: list[tuple[str, Digest]]) -> None:
        """Parse this level's directories; MissingBlobsError lists all of them that are absent."""
        wanted = list(dict.fromkeys(d for _, d in level if d not in self._parsed))
        missing = self._store.find_missing(wanted)
        if missing:
            raise _missing(missing, "input directories")
        for digest in wanted:
            where = next(p for p, d in level if d == digest) or "the input root"
            self._parsed[digest] = _parse(self._store, digest, re_pb.Directory(), f"directory {where!r}")

    def _entries(self, path: str, directory: re_pb.Directory) -> list[tuple[str, Digest]]:
        names: set[str] = set()
        where = path or "the input root"

        def named(name: str) -> str:
            if not name or "/" in name or name in (".", "..") or "\x00" in name:
                raise InvalidRequestError(f"directory {where!r}: {name!r} is not a valid entry name")
            if name in names:
                raise InvalidRequestError(f"directory {where!r}: {name!r} is listed twice")
            names.add(name)
            self._count()
            return f"{path}/{name}" if path else name

        for f in directory.files:
            full = named(f.name)
            digest = digest_from_pb(f.digest, f"directory {where!r}: file {f.name!r}")
            self.files.append(InputFile(path=full, digest=digest, executable=f.is_executable))
        for s in directory.symlinks:
            self.symlinks.append(InputSymlink(path=named(s.name), target=s.target))
        children = []
        for d in directory.directories:
            full = named(d.name)
            self.directories.append(full)
            children.append((full, digest_from_pb(d.digest, f"directory {where!r}: directory {d.name!r}")))
        return children

    def _count(self) -> None:
        if (
            self._max is not None
            and len(self.files) + len(self.directories) + len(self.symlinks) >= self._max
        ):
            raise InvalidRequestError(
                f"action.input_root_digest: the input tree has more than {self._max} entries "
                "(execution.max_input_entries)"
            )


def _parse(store: BlobStore, digest: Digest, message: _M, what: str) -> _M:
    """``message`` parsed from the blob; absent is MissingBlobsError, malformed InvalidRequestError."""
    try:
        message.ParseFromString(read_blob(store, digest))
    except NotFoundError:
        raise _missing([digest], what) from None
    except DecodeError as err:
        raise InvalidRequestError(f"{what}: blob {digest} is not a {type(message).__name__}") from err
    return message


def _missing(digests: list[Digest], what: str) -> MissingBlobsError:
    return MissingBlobsError(
        f"{what}: {len(digests)} blob(s) are not in the CAS ({name_some(digests)}); "
        "upload them and execute again",
        digests=tuple(digests),
    )


def _output_parents(tree: _InputTree, *outputs: tuple[str, ...]) -> list[str]:
    """Every directory above an output that the input tree does not already have, once."""
    known = set(tree.directories)
    files = {f.path for f in tree.files} | {s.path for s in tree.symlinks}
    parents: dict[str, None] = {}
    for paths in outputs:
        for path in paths:
            parent = posixpath.dirname(path)
            while parent and parent not in known and parent not in parents and parent not in files:
                parents[parent] = None
                parent = posixpath.dirname(parent)
    return sorted(parents, key=lambda p: p.count("/"))


def _normal(path: str, field: str) -> str:
    """A relative path normalised (``a/./b`` → ``a/b``); one that climbs out is refused."""
    if not path:
        return ""
    if path.startswith("/"):
        raise InvalidRequestError(f"{field}: {path!r} must be relative")
    normal = posixpath.normpath(path)
    if normal == ".":
        return ""
    if normal == ".." or normal.startswith("../"):
        raise InvalidRequestError(f"{field}: {path!r} leads out of the input root")
    return normal


def read_blob(store: BlobStore, digest: Digest) -> bytes:
    """A whole blob in memory; for blobs a message carries anyway. Runs on a thread."""
    return b"".join(store.open_blob(digest))
