"""An engine result in REAPI terms: output files, Trees for output directories, metadata, a status."""

from __future__ import annotations

import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, status_pb2

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.frontdoors._remote_actions._digests import digest_to_pb
from expbuild_worker.frontdoors._remote_actions._load import LoadedAction
from expbuild_worker.model import ActionResult, Digest, ExecutionStatus, OutputFile, StageTimes
from expbuild_worker.storage import BlobPin, BlobStore

_STATUS_CODES = {
    ExecutionStatus.COMPLETED: code_pb2.OK,
    ExecutionStatus.OOM_KILLED: code_pb2.OK,  # the command ran and died; exit code and message say how
    ExecutionStatus.TIMED_OUT: code_pb2.DEADLINE_EXCEEDED,
    ExecutionStatus.CANCELLED: code_pb2.CANCELLED,
    ExecutionStatus.FAILED_TO_START: code_pb2.INVALID_ARGUMENT,
    ExecutionStatus.OUTPUT_LIMIT_EXCEEDED: code_pb2.RESOURCE_EXHAUSTED,
    ExecutionStatus.DISK_LIMIT_EXCEEDED: code_pb2.RESOURCE_EXHAUSTED,
    ExecutionStatus.INTERNAL: code_pb2.INTERNAL,
}
"""The ExecuteResponse status for each way an action ends. A non-zero exit (or death by a signal,
out-of-memory kills included) is a result, OK; a timeout is DEADLINE_EXCEEDED with the partial
result, as the REAPI specifies; a command that could not start is the client's to fix."""


def execute_response(
    loaded: LoadedAction, result: ActionResult, *, worker: str, store: BlobStore, pin: BlobPin
) -> re_pb.ExecuteResponse:
    """The ExecuteResponse for ``result``; Tree (and Directory) blobs go into ``store``, held by
    ``pin``. Disk I/O: call on a thread."""
    reapi_result = action_result(loaded, result, worker=worker, store=store, pin=pin)
    code = _STATUS_CODES[result.status]
    status = status_pb2.Status(code=code, message=result.message if code != code_pb2.OK else "")
    return re_pb.ExecuteResponse(result=reapi_result, status=status, message=result.message)


def cacheable(loaded: LoadedAction, result: ActionResult) -> bool:
    """Only a successful run of an action that may be cached goes into the action cache."""
    return result.status is ExecutionStatus.COMPLETED and result.exit_code == 0 and not loaded.do_not_cache


def action_result(
    loaded: LoadedAction, result: ActionResult, *, worker: str, store: BlobStore, pin: BlobPin
) -> re_pb.ActionResult:
    out = re_pb.ActionResult()
    if result.exit_code is not None:
        out.exit_code = result.exit_code
    elif result.signal is not None:
        out.exit_code = 128 + result.signal  # what a shell reports for a command a signal ended
    if result.stdout_digest is not None:
        out.stdout_digest.CopyFrom(digest_to_pb(result.stdout_digest))
    if result.stderr_digest is not None:
        out.stderr_digest.CopyFrom(digest_to_pb(result.stderr_digest))
    _fill_outputs(out, loaded, result, store, pin)
    _fill_metadata(out.execution_metadata, result.times, worker)
    return out


@dataclass
class _Folder:
    """One directory of an output tree while it is assembled."""

    files: list[re_pb.FileNode] = field(default_factory=list)
    symlinks: list[re_pb.SymlinkNode] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)


def _fill_outputs(
    out: re_pb.ActionResult, loaded: LoadedAction, result: ActionResult, store: BlobStore, pin: BlobPin
) -> None:
    manifest = result.outputs
    declared_files = set(loaded.output_files)
    declared_dirs = set(loaded.output_directories)
    either = set(loaded.output_paths)
    directories = set(manifest.directories)
    for f in manifest.files:
        if f.path in declared_files or f.path in either:
            out.output_files.add(
                path=loaded.client_path(f.path), digest=digest_to_pb(f.digest), is_executable=f.executable
            )
    for link in manifest.symlinks:
        entry = re_pb.OutputSymlink(path=loaded.client_path(link.path), target=link.target)
        if link.path in declared_files:
            out.output_file_symlinks.append(entry)
            out.output_symlinks.append(entry)
        elif link.path in declared_dirs:
            out.output_directory_symlinks.append(entry)
            out.output_symlinks.append(entry)
        elif link.path in either:
            out.output_symlinks.append(entry)
    folders = _folders(result)
    with_directories = loaded.output_directory_format in (
        re_pb.Command.OutputDirectoryFormat.DIRECTORY_ONLY,
        re_pb.Command.OutputDirectoryFormat.TREE_AND_DIRECTORY,
    )
    with_tree = loaded.output_directory_format != re_pb.Command.OutputDirectoryFormat.DIRECTORY_ONLY
    for path in sorted((declared_dirs | either) & directories):
        tree, messages = _tree(path, folders)
        directory_entry = out.output_directories.add(
            path=loaded.client_path(path), is_topologically_sorted=False
        )
        if with_tree:
            directory_entry.tree_digest.CopyFrom(
                digest_to_pb(_put(store, pin, tree.SerializeToString(deterministic=True)))
            )
        if with_directories:
            for message in messages:
                _put(store, pin, message)
            root = Digest.of_bytes(tree.root.SerializeToString(deterministic=True))
            directory_entry.root_directory_digest.CopyFrom(digest_to_pb(root))


def _folders(result: ActionResult) -> dict[str, _Folder]:
    """Every collected directory with its direct children (names only for subdirectories)."""
    folders: dict[str, _Folder] = defaultdict(_Folder)
    for directory in result.outputs.directories:
        folders[directory]
        parent, _, name = directory.rpartition("/")
        folders[parent].directories.append(name)
    for f in result.outputs.files:
        parent, _, name = f.path.rpartition("/")
        folders[parent].files.append(_file_node(name, f))
    for link in result.outputs.symlinks:
        parent, _, name = link.path.rpartition("/")
        folders[parent].symlinks.append(re_pb.SymlinkNode(name=name, target=link.target))
    return folders


def _file_node(name: str, f: OutputFile) -> re_pb.FileNode:
    return re_pb.FileNode(name=name, digest=digest_to_pb(f.digest), is_executable=f.executable)


def _tree(path: str, folders: dict[str, _Folder]) -> tuple[re_pb.Tree, list[bytes]]:
    """The Tree of the output directory at ``path``, and each distinct Directory serialized."""
    encoded: dict[str, bytes] = {}

    def directory(at: str) -> re_pb.Directory:
        folder = folders.get(at, _Folder())
        message = re_pb.Directory()
        message.files.extend(sorted(folder.files, key=lambda n: n.name))
        message.symlinks.extend(sorted(folder.symlinks, key=lambda n: n.name))
        for name in sorted(folder.directories):
            child = directory(posixpath.join(at, name))
            data = child.SerializeToString(deterministic=True)
            encoded[posixpath.join(at, name)] = data
            message.directories.add(name=name, digest=digest_to_pb(Digest.of_bytes(data)))
        return message

    root = directory(path)
    children: dict[bytes, re_pb.Directory] = {}
    for data in encoded.values():
        if data not in children:
            child = re_pb.Directory()
            child.ParseFromString(data)
            children[data] = child
    tree = re_pb.Tree(root=root, children=list(children.values()))
    return tree, [root.SerializeToString(deterministic=True), *children]


def _put(store: BlobStore, pin: BlobPin, data: bytes) -> Digest:
    digest = store.put_bytes(data)
    pin.add(digest)
    return digest


def _fill_metadata(out: re_pb.ExecutedActionMetadata, times: StageTimes, worker: str) -> None:
    out.worker = worker
    for name, at in (
        ("queued_timestamp", times.queued),
        ("worker_start_timestamp", times.worker_start),
        ("input_fetch_start_timestamp", times.worker_start),
        ("input_fetch_completed_timestamp", times.inputs_staged),
        ("execution_start_timestamp", times.command_start),
        ("execution_completed_timestamp", times.command_end),
        ("output_upload_start_timestamp", times.outputs_started),
        ("output_upload_completed_timestamp", times.outputs_collected),
        ("worker_completed_timestamp", times.outputs_collected or times.left_queue or times.inputs_staged),
    ):
        if at is not None:
            stamp = Timestamp()
            stamp.FromNanoseconds(int(at * 1e9))
            getattr(out, name).CopyFrom(stamp)
