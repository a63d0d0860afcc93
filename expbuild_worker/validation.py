"""The one place that owns path, identifier and size rules for incoming actions."""

from __future__ import annotations

import math
import posixpath
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


def check_relative_path(value: str, field: str, *, allow_empty: bool = False) -> None:
    """Refuse anything but a normalised relative path that stays inside the action root."""
    if value == "":
        if allow_empty:
            return
        raise InvalidRequestError(f"{field}: must not be empty")
    if "\x00" in value:
        raise InvalidRequestError(f"{field}: contains a NUL byte")
    if len(value.encode()) > MAX_PATH_BYTES:
        raise InvalidRequestError(f"{field}: longer than {MAX_PATH_BYTES} bytes")
    if value.startswith("/"):
        raise InvalidRequestError(f"{field}: must be relative to the action root, got absolute {value!r}")
    parts = value.split("/")
    if any(p == ".." for p in parts):
        raise InvalidRequestError(f"{field}: must not contain '..' components, got {value!r}")
    if any(p in ("", ".") for p in parts):
        raise InvalidRequestError(
            f"{field}: must be normalised (no empty, '.' or trailing '/' components), got {value!r}"
        )
    if len(parts) > MAX_PATH_DEPTH:
        raise InvalidRequestError(f"{field}: more than {MAX_PATH_DEPTH} components")
    if len(value) <= MAX_NAME_BYTES // 4:  # no component can be too long (UTF-8: 4 bytes a character)
        return
    for part in parts:
        if len(part.encode()) > MAX_NAME_BYTES:
            raise InvalidRequestError(
                f"{field}: component {part[:40]!r}... is longer than {MAX_NAME_BYTES} bytes"
            )


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


def _check_symlink_target(path: str, target: str, field: str, links: Collection[str]) -> None:
    """The target must resolve inside the root without passing through another input symlink
    (``links``): a symlink's own target is not known here, so ``x/..`` with ``x -> .`` could
    leave the root. Pointing at a symlink (as the last component) is fine."""
    if target == "" or "\x00" in target:
        raise InvalidRequestError(f"{field}: must be a non-empty target without NUL bytes")
    if len(target.encode()) > MAX_SYMLINK_TARGET_BYTES:
        raise InvalidRequestError(f"{field}: longer than {MAX_SYMLINK_TARGET_BYTES} bytes")
    if target.startswith("/"):
        raise InvalidRequestError(f"{field}: must be relative, got absolute {target!r}")
    parts = [p for p in posixpath.dirname(path).split("/") if p]
    steps = [p for p in target.split("/") if p not in ("", ".")]
    for i, step in enumerate(steps):
        if step == "..":
            if not parts:
                raise InvalidRequestError(f"{field}: {target!r} from {path!r} points outside the action root")
            parts.pop()
            continue
        parts.append(step)
        through = "/".join(parts)
        if i < len(steps) - 1 and through in links:
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


def _check_unique(paths: Iterable[tuple[str, str]]) -> None:
    """No path may be declared twice, nor under a path declared as a file or symlink."""
    seen: dict[str, str] = {}
    for field, path in paths:
        if path in seen:
            raise InvalidRequestError(f"{field}: path {path!r} is already declared by {seen[path]}")
        seen[path] = field


def validate_action(
    action: Action,
    *,
    max_inline_input_bytes: int,
    max_timeout_seconds: float,
    max_limits: ResourceLimits,
    executor: str,
) -> None:
    """Raise InvalidRequestError naming the first offending field; return quietly when valid."""
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
    files: list[str] = []
    leaves: list[tuple[str, str]] = []
    for i, f in enumerate(action.input_files):
        field = f"input_files[{i}]"
        check_relative_path(f.path, f"{field}.path")
        if (f.content is None) == (f.digest is None):
            raise InvalidRequestError(f"{field}: set exactly one of content and digest")
        if f.digest is not None:
            check_digest(f.digest, f"{field}.digest")
        else:
            assert f.content is not None
            inline += len(f.content)
        files.append(f.path)
        leaves.append((f"{field}.path", f.path))
    if inline > max_inline_input_bytes:
        raise InvalidRequestError(
            f"input_files: {inline} bytes of inline content exceed the cap of {max_inline_input_bytes} "
            "(upload large inputs with UploadBlobs and reference them by digest)"
        )
    for i, d in enumerate(action.input_directories):
        check_relative_path(d, f"input_directories[{i}]")
    links = {link.path for link in action.input_symlinks}
    for i, link in enumerate(action.input_symlinks):
        field = f"input_symlinks[{i}]"
        check_relative_path(link.path, f"{field}.path")
        _check_symlink_target(link.path, link.target, f"{field}.target", links)
        leaves.append((f"{field}.path", link.path))
    _check_unique(leaves)
    leaf_set = {p for _, p in leaves}
    for i, d in enumerate(action.input_directories):
        if d in leaf_set:
            raise InvalidRequestError(f"input_directories[{i}]: {d!r} is also declared as a file or symlink")
    if action.working_directory in leaf_set:
        raise InvalidRequestError(
            f"working_directory: {action.working_directory!r} is declared as a file or symlink"
        )
    for field, path in [
        *((f"input_files[{i}].path", f.path) for i, f in enumerate(action.input_files)),
        *((f"input_symlinks[{i}].path", s.path) for i, s in enumerate(action.input_symlinks)),
        *((f"input_directories[{i}]", d) for i, d in enumerate(action.input_directories)),
        *([("working_directory", action.working_directory)] if action.working_directory else []),
    ]:
        parent = posixpath.dirname(path)
        while parent:
            if parent in leaf_set:
                raise InvalidRequestError(
                    f"{field}: {path!r} lies under {parent!r}, which is a file or symlink"
                )
            parent = posixpath.dirname(parent)
    for i, out in enumerate(action.output_files):
        check_relative_path(out, f"output_files[{i}]")
    for i, out in enumerate(action.output_directories):
        check_relative_path(out, f"output_directories[{i}]")

    if action.timeout_seconds is not None:
        if action.timeout_seconds <= 0:
            raise InvalidRequestError(f"timeout: expected a positive duration, got {action.timeout_seconds}s")
        if action.timeout_seconds > max_timeout_seconds:
            raise InvalidRequestError(
                f"timeout: {action.timeout_seconds}s is above the maximum of {max_timeout_seconds}s"
            )
    _check_limits(action.limits, max_limits, executor)
