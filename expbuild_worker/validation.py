"""The one place that owns path, identifier and size rules for incoming actions."""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Collection, Iterable

from expbuild_worker.errors import InvalidRequestError
from expbuild_worker.model import Action, ResourceLimits
from expbuild_worker.storage._cas import check_digest

_EXECUTION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_IMAGE_REFERENCE = re.compile(
    r"(?:(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])(?:\.(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]))*"
    r"(?::[0-9]+)?/)?"  # registry host[:port]/
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"  # name
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"  # :tag
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"  # @digest
)
"""A container image reference as the engines read it: [host[:port]/]name[:tag][@digest]."""
_ENV_NAME = re.compile(r"[^=\x00]+")
MAX_PATH_BYTES = 3072
"""The longest path in a request or a result. The kernel takes paths of up to 4096 bytes; the
rest is room for the worker's own prefix (``MAX_WORK_ROOT_BYTES`` and the action directory)."""
MAX_WORK_ROOT_BYTES = 960
"""The longest work root (absolute): with "/actions/<32 hex>/" and any allowed path it stays under 4096."""
MAX_SYMLINK_TARGET_BYTES = 4095
"""The longest symlink target the kernel stores."""
MAX_NAME_BYTES = 255
"""The longest file name (one path component) Linux filesystems take."""
_LONG_NAME = re.compile(f"(?<![^/])[^/]{{{MAX_NAME_BYTES + 1}}}")
"""A path component longer than a file name may be (the look-behind makes the scan linear:
a match is tried only where a component starts)."""
_LONG_NAME_BYTES = re.compile(_LONG_NAME.pattern.encode())
MAX_PATH_DEPTH = 256
"""The most components a path may have: deeper trees serve no build and make every walk costly."""
MAX_PROCESSES = 4_194_304
"""The kernel's highest possible pid count (PID_MAX_LIMIT); a larger process limit means nothing."""
MAX_CPU_CORES = 65_536.0
_CEILINGS = {"cpu_cores": MAX_CPU_CORES, "max_processes": float(MAX_PROCESSES)}


def check_execution_id(value: str, field: str = "execution_id") -> None:
    if not _EXECUTION_ID.fullmatch(value):
        raise InvalidRequestError(
            f"{field}: expected 1-128 characters of [A-Za-z0-9._:-], got {value[:140]!r}"
        )


def check_image_reference(image: str, field: str) -> None:
    if len(image) > 512 or not _IMAGE_REFERENCE.fullmatch(image):
        raise InvalidRequestError(
            f"{field}: {image[:100]!r} is not an image reference ([host/]name[:tag][@digest], "
            "lower-case name, at most 512 characters)"
        )


def _path_problem(value: str) -> str:
    """Why ``value`` is not a normalised relative path inside the action root; '' when it is.

    Only whole-string operations (no loop over components in Python): a request may carry
    hundreds of thousands of paths, each up to ``MAX_PATH_DEPTH`` components deep."""
    if value == "":
        return "must not be empty"
    if "\x00" in value:
        return "contains a NUL byte"
    ascii_only = value.isascii()
    size = len(value) if ascii_only else len(value.encode())
    if size > MAX_PATH_BYTES:
        return f"longer than {MAX_PATH_BYTES} bytes"
    if value.startswith("/"):
        return f"must be relative to the action root, got absolute {value!r}"
    padded = f"/{value}/"
    if "/../" in padded:
        return f"must not contain '..' components, got {value!r}"
    if "//" in padded or "/./" in padded:
        return f"must be normalised (no empty, '.' or trailing '/' components), got {value!r}"
    if value.count("/") >= MAX_PATH_DEPTH:
        return f"more than {MAX_PATH_DEPTH} components"
    if size > MAX_NAME_BYTES:  # only then can one component be too long
        long = _LONG_NAME.search(value) if ascii_only else _LONG_NAME_BYTES.search(value.encode())
        if long is not None:
            start = long.group()[:40]
            name = start if isinstance(start, str) else start.decode(errors="replace")
            return f"component {name!r}... is longer than {MAX_NAME_BYTES} bytes"
    return ""


def check_relative_path(value: str, field: str, *, allow_empty: bool = False) -> None:
    """Refuse anything but a normalised relative path that stays inside the action root."""
    if value == "" and allow_empty:
        return
    if problem := _path_problem(value):
        raise InvalidRequestError(f"{field}: {problem}")


def output_path_problem(path: str, size: int) -> str:
    """Why an output path a command made (``size`` bytes as UTF-8) cannot travel in a result:
    nested deeper or longer than a request's paths may be; '' when it can."""
    if path.count("/") >= MAX_PATH_DEPTH:
        return f"output {path[:100]!r}... is nested deeper than {MAX_PATH_DEPTH} levels"
    if size > MAX_PATH_BYTES:
        return f"output {path[:100]!r}... is longer than {MAX_PATH_BYTES} bytes"
    return ""


def is_valid_relative_path(value: str) -> bool:
    """The same rule as ``check_relative_path``, as a yes/no (for clients checking what a worker sent)."""
    try:
        check_relative_path(value, "path")
    except InvalidRequestError:
        return False
    return True


def _check_symlink_target(
    path: str, target: str, field: str, links: Collection[str], link_names: Collection[str]
) -> None:
    """The target must resolve inside the root without passing through another input symlink
    (``links``, whose last components are ``link_names``): a symlink's own target is not known
    here, so ``x/..`` with ``x -> .`` could leave the root. Pointing at a symlink (as the last
    component) is fine. A prefix is joined only when its last step names some input symlink,
    so a long target costs one pass over its steps, not one join per step."""
    if target == "" or "\x00" in target:
        raise InvalidRequestError(f"{field}: must be a non-empty target without NUL bytes")
    if len(target.encode()) > MAX_SYMLINK_TARGET_BYTES:
        raise InvalidRequestError(f"{field}: longer than {MAX_SYMLINK_TARGET_BYTES} bytes")
    if target.startswith("/"):
        raise InvalidRequestError(f"{field}: must be relative, got absolute {target!r}")
    parts = path.split("/")[:-1]
    steps = [p for p in target.split("/") if p not in ("", ".")]
    last = len(steps) - 1
    for i, step in enumerate(steps):
        if step == "..":
            if not parts:
                raise InvalidRequestError(f"{field}: {target!r} from {path!r} points outside the action root")
            parts.pop()
            continue
        parts.append(step)
        if i < last and step in link_names and len(parts) <= MAX_PATH_DEPTH:
            through = "/".join(parts)
            if through in links:
                raise InvalidRequestError(
                    f"{field}: {target!r} from {path!r} passes through the input symlink {through!r}; "
                    "point at the path it leads to instead"
                )


def _check_limits(limits: ResourceLimits, maxima: ResourceLimits, executor: str) -> None:
    pairs: list[tuple[str, float | None, float | None]] = [
        ("cpu_cores", limits.cpu_cores, maxima.cpu_cores),
        ("memory_bytes", limits.memory_bytes, maxima.memory_bytes),
        ("max_processes", limits.max_processes, maxima.max_processes),
        ("disk_bytes", limits.disk_bytes, maxima.disk_bytes),
    ]
    for name, value, maximum in pairs:
        if value is None:
            continue
        if not math.isfinite(value) or value <= 0:
            raise InvalidRequestError(f"limits.{name}: expected a positive number, got {value}")
        ceiling = _CEILINGS.get(name)
        if ceiling is not None and value > ceiling:
            raise InvalidRequestError(f"limits.{name}: {value:g} is more than any machine has ({ceiling:g})")
        if maximum is not None and value > maximum:
            raise InvalidRequestError(
                f"limits.{name}: {value} is above executor {executor!r}'s maximum of {maximum}"
            )


def check_input_entries(files: int, directories: int, symlinks: int, maximum: int | None) -> None:
    """Refuse an action declaring more than ``maximum`` inputs (None: no limit), before any
    per-path work: every entry costs validation, staging and memory."""
    total = files + directories + symlinks
    if maximum is not None and total > maximum:
        raise InvalidRequestError(
            f"input_files, input_directories, input_symlinks: {total} entries, more than "
            f"execution.max_input_entries ({maximum})"
        )


def check_digest_count(count: int, maximum: int) -> None:
    """Refuse a FindMissingBlobs request with more than ``maximum`` digests, before reading any."""
    if count > maximum:
        raise InvalidRequestError(
            f"digests: {count} digests, more than execution.max_digests_per_request ({maximum}); "
            "split the request"
        )


def _field_of(action: Action, path: str) -> str:
    """The first field declaring ``path`` (for error messages only: a scan of the whole action)."""
    for i, f in enumerate(action.input_files):
        if f.path == path:
            return f"input_files[{i}].path"
    for i, link in enumerate(action.input_symlinks):
        if link.path == path:
            return f"input_symlinks[{i}].path"
    for i, d in enumerate(action.input_directories):
        if d == path:
            return f"input_directories[{i}]"
    return "working_directory"


def _check_input_tree(action: Action) -> None:
    """No path is declared twice as a file or symlink, no directory is also a file or symlink,
    and nothing (the working directory included) lies under a file or symlink.

    Everything under ``leaf/`` is one contiguous run of the sorted paths, so each file or
    symlink costs one binary search. Walking every path's parents instead costs depth times
    length per path, and remembering the parents already
    checked only helps when paths share them: distinct deep paths would fill that memo with
    millions of prefixes."""
    leaves = [f.path for f in action.input_files]
    leaves.extend(link.path for link in action.input_symlinks)
    leaf_set = set(leaves)
    if len(leaf_set) != len(leaves):
        first: dict[str, int] = {}
        for i, path in enumerate(leaves):
            if path in first:
                raise InvalidRequestError(
                    f"{_leaf_field(action, i)}: path {path!r} is already declared by "
                    f"{_leaf_field(action, first[path])}"
                )
            first[path] = i
    if not leaf_set.isdisjoint(action.input_directories):
        for i, d in enumerate(action.input_directories):
            if d in leaf_set:
                raise InvalidRequestError(
                    f"input_directories[{i}]: {d!r} is also declared as a file or symlink"
                )
    if action.working_directory in leaf_set:
        raise InvalidRequestError(
            f"working_directory: {action.working_directory!r} is declared as a file or symlink"
        )
    ordered = sorted(leaf_set.union(action.input_directories, (action.working_directory,)))
    for leaf in leaves:
        prefix = leaf + "/"
        i = bisect.bisect_left(ordered, prefix)
        if i < len(ordered) and ordered[i].startswith(prefix):
            path = ordered[i]
            raise InvalidRequestError(
                f"{_field_of(action, path)}: {path!r} lies under {leaf!r}, which is a file or symlink"
            )


def _leaf_field(action: Action, index: int) -> str:
    files = len(action.input_files)
    return f"input_files[{index}].path" if index < files else f"input_symlinks[{index - files}].path"


def validate_action(
    action: Action,
    *,
    max_inline_input_bytes: int,
    max_timeout_seconds: float,
    max_limits: ResourceLimits,
    executor: str,
    max_input_entries: int | None = None,
) -> None:
    """Raise InvalidRequestError naming the first offending field; return quietly when valid.

    Takes time linear in the size of the action (sorting aside), with no loop over path
    components in Python; still, a large action takes a noticeable time, so callers on an
    event loop hand large ones to a thread."""
    check_input_entries(
        len(action.input_files), len(action.input_directories), len(action.input_symlinks), max_input_entries
    )
    check_execution_id(action.execution_id)
    if not action.argv:
        raise InvalidRequestError("argv: must hold at least the program to run")
    for i, arg in enumerate(action.argv):
        if "\x00" in arg:
            raise InvalidRequestError(f"argv[{i}]: contains a NUL byte")
    if action.argv[0] == "":
        raise InvalidRequestError("argv[0]: must not be empty")
    for name, value in action.environment.items():
        if not _ENV_NAME.fullmatch(name):
            raise InvalidRequestError(f"environment: invalid variable name {name!r} (empty, '=' or NUL)")
        if "\x00" in value:
            raise InvalidRequestError(f"environment[{name!r}]: value contains a NUL byte")
    check_relative_path(action.working_directory, "working_directory", allow_empty=True)
    if action.image is not None:
        check_image_reference(action.image, "container_image")

    inline = 0
    for i, f in enumerate(action.input_files):
        if problem := _path_problem(f.path):
            raise InvalidRequestError(f"input_files[{i}].path: {problem}")
        if (f.content is None) == (f.digest is None):
            raise InvalidRequestError(f"input_files[{i}]: set exactly one of content and digest")
        if f.digest is not None:
            check_digest(f.digest, f"input_files[{i}].digest")
        else:
            assert f.content is not None
            inline += len(f.content)
    if inline > max_inline_input_bytes:
        raise InvalidRequestError(
            f"input_files: {inline} bytes of inline content exceed the cap of {max_inline_input_bytes} "
            "(upload large inputs with UploadBlobs and reference them by digest)"
        )
    _check_paths(action.input_directories, "input_directories[{}]")
    links = {link.path for link in action.input_symlinks}
    link_names = {path.rpartition("/")[2] for path in links}
    for i, link in enumerate(action.input_symlinks):
        check_relative_path(link.path, f"input_symlinks[{i}].path")
        _check_symlink_target(link.path, link.target, f"input_symlinks[{i}].target", links, link_names)
    _check_input_tree(action)
    _check_paths(action.output_files, "output_files[{}]")
    _check_paths(action.output_directories, "output_directories[{}]")
    _check_paths(action.output_paths, "output_paths[{}]")

    if action.timeout_seconds is not None:
        if action.timeout_seconds <= 0:
            raise InvalidRequestError(f"timeout: expected a positive duration, got {action.timeout_seconds}s")
        if action.timeout_seconds > max_timeout_seconds:
            raise InvalidRequestError(
                f"timeout: {action.timeout_seconds}s is above the maximum of {max_timeout_seconds}s"
            )
    _check_limits(action.limits, max_limits, executor)


def _check_paths(paths: Iterable[str], field: str) -> None:
    """``check_relative_path`` for each path, the field (a format with the index) built only on error."""
    for i, path in enumerate(paths):
        if problem := _path_problem(path):
            raise InvalidRequestError(f"{field.format(i)}: {problem}")
