"""The rules for incoming actions: counts refused first, path rules, and cost linear in the request."""

from __future__ import annotations

import time

import pytest

from expbuild_worker.errors import InvalidRequestError
from expbuild_worker.model import Action, InputFile, InputSymlink, ResourceLimits
from expbuild_worker.validation import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    MAX_PATH_DEPTH,
    check_digest_count,
    check_relative_path,
    validate_action,
)


def action(**fields):
    return Action(execution_id="e1", argv=("/bin/true",), environment={}, **fields)


def validate(act, *, max_input_entries=None):
    validate_action(
        act,
        max_inline_input_bytes=1 << 20,
        max_timeout_seconds=60.0,
        max_limits=ResourceLimits(),
        executor="host",
        max_input_entries=max_input_entries,
    )


def refusal(act, **kwargs):
    with pytest.raises(InvalidRequestError) as info:
        validate(act, **kwargs)
    return str(info.value)


def file(path):
    return InputFile(path=path, content=b"")


def test_too_many_entries_are_refused_first_naming_the_fields_and_the_setting():
    """The count is checked before any path, so an oversized request costs nothing to refuse."""
    act = action(
        input_files=(file("/absolute"),),  # also invalid, but the count is what the client must fix
        input_directories=("d", "e"),
        input_symlinks=(InputSymlink("l", "d"),),
    )
    assert refusal(act, max_input_entries=3) == (
        "input_files, input_directories, input_symlinks: 4 entries, more than execution.max_input_entries (3)"
    )


def test_as_many_entries_as_allowed_pass_and_none_means_no_limit():
    """The cap is inclusive, and a caller that sets none (other front doors) is not limited."""
    act = action(input_files=(file("a"),), input_directories=("d", "e"))
    validate(act, max_input_entries=3)
    validate(act, max_input_entries=None)


def test_too_many_digests_name_the_field_and_the_setting():
    """A client over the lookup cap learns which field to split and which setting holds the cap."""
    check_digest_count(100, 100)
    with pytest.raises(InvalidRequestError) as info:
        check_digest_count(101, 100)
    assert str(info.value).startswith(
        "digests: 101 digests, more than execution.max_digests_per_request (100)"
    )


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        pytest.param("", "must not be empty", id="empty"),
        pytest.param("/etc/passwd", "must be relative", id="absolute"),
        pytest.param("a/../../x", "'..' components", id="dotdot"),
        pytest.param("..", "'..' components", id="only-dotdot"),
        pytest.param("a//b", "must be normalised", id="empty-component"),
        pytest.param("./a", "must be normalised", id="dot-component"),
        pytest.param("a/.", "must be normalised", id="trailing-dot"),
        pytest.param("a/", "must be normalised", id="trailing-slash"),
        pytest.param("a\x00b", "NUL byte", id="nul"),
        pytest.param("a/" * MAX_PATH_DEPTH + "a", f"more than {MAX_PATH_DEPTH} components", id="too-deep"),
        pytest.param(
            "é" * (MAX_PATH_BYTES // 2 + 1), f"longer than {MAX_PATH_BYTES} bytes", id="too-long-utf8"
        ),
        pytest.param("d/" + "x" * (MAX_NAME_BYTES + 1), "is longer than 255 bytes", id="long-name"),
        pytest.param("d/" + "é" * 128, "is longer than 255 bytes", id="long-name-utf8"),
    ],
)
def test_bad_paths_are_refused_naming_the_field(path, problem):
    """A path must stay inside the action root and be one the kernel and filesystems accept."""
    message = refusal(action(input_directories=("ok", path)))
    assert message.startswith("input_directories[1]: ")
    assert problem in message


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("a/b/c", id="nested"),
        pytest.param("..a/b..", id="dots-inside-names"),
        pytest.param(".hidden/x", id="hidden"),
        pytest.param("a/" * (MAX_PATH_DEPTH - 1) + "a", id="deepest"),
        pytest.param("x" * MAX_NAME_BYTES + "/" + "é" * 127, id="longest-names"),
    ],
)
def test_good_paths_pass(path):
    """Names that merely contain dots, and paths at every limit, are ordinary build paths."""
    check_relative_path(path, "path")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param(
            {"input_files": (file("a"),), "input_directories": ("a/b",)},
            "input_directories[0]: 'a/b' lies under 'a', which is a file or symlink",
            id="dir-under-file",
        ),
        pytest.param(
            {"input_files": (file("a"), file("a/b/c"))},
            "input_files[1].path: 'a/b/c' lies under 'a', which is a file or symlink",
            id="file-under-file",
        ),
        pytest.param(
            {"input_symlinks": (InputSymlink("l", "."),), "working_directory": "l/w"},
            "working_directory: 'l/w' lies under 'l', which is a file or symlink",
            id="workdir-under-symlink",
        ),
        pytest.param(
            # "a!x" sorts between "a" and "a/x": the search must not stop at it.
            {"input_files": (file("a"), file("a!x")), "input_directories": ("a/x",)},
            "input_directories[0]: 'a/x' lies under 'a', which is a file or symlink",
            id="under-file-past-a-sibling",
        ),
        pytest.param(
            {"input_files": (file("a"),), "input_symlinks": (InputSymlink("a", "b"),)},
            "input_symlinks[0].path: path 'a' is already declared by input_files[0].path",
            id="file-and-symlink",
        ),
        pytest.param(
            {"input_files": (file("a"),), "input_directories": ("a",)},
            "input_directories[0]: 'a' is also declared as a file or symlink",
            id="dir-and-file",
        ),
        pytest.param(
            {"input_symlinks": (InputSymlink("x", "."), InputSymlink("y", "x/../..")), "input_files": ()},
            "input_symlinks[1].target: 'x/../..' from 'y' passes through the input symlink 'x'; "
            "point at the path it leads to instead",
            id="target-through-symlink",
        ),
        pytest.param(
            {"input_symlinks": (InputSymlink("d/l", "../../x"),)},
            "input_symlinks[0].target: '../../x' from 'd/l' points outside the action root",
            id="target-outside",
        ),
    ],
)
def test_conflicting_inputs_are_refused_naming_the_field(fields, message):
    """Staging could not create such a tree, or a symlink could carry a write outside the root."""
    assert refusal(action(**fields)) == message


def test_prefixes_that_are_not_parents_and_symlink_chains_pass():
    """'a' as a file says nothing about 'ab' or 'a.b'; a symlink may point at a symlink."""
    validate(
        action(
            input_files=(file("a"), file("ab/c")),
            input_directories=("a.b/d", "a-b"),
            input_symlinks=(InputSymlink("s", "a"), InputSymlink("t", "s")),
            working_directory="ab",
        )
    )


def test_a_hundred_thousand_deep_paths_validate_in_time_linear_in_their_size():
    """A request at the size cap must be judged in a fraction of a second, not the 5-25 s a walk
    over every path's parents took; the bound is loose because test machines are shared."""
    deep = "/".join(["d"] * (MAX_PATH_DEPTH - 20))
    dirs = tuple(f"top{i}/{deep}" for i in range(110_000))  # no shared parents: nothing to memoise
    files = tuple(file(f"top{i}/{deep}/f") for i in range(0, 110_000, 11))
    act = action(input_directories=dirs, input_files=files)
    start = time.perf_counter()
    validate(act, max_input_entries=200_000)
    elapsed = time.perf_counter() - start
    print(f"\nvalidated {len(dirs) + len(files)} entries of depth {MAX_PATH_DEPTH - 18} in {elapsed:.2f} s")
    assert elapsed < 4.0
