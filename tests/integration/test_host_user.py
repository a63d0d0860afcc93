"""A root worker's host actions run unprivileged: they cannot leave their cgroup or outlive the action."""

from __future__ import annotations

import os
import re

import pytest
from _support import execute, request, wait_gone

from expbuild_worker.api.v1 import worker_pb2 as pb

SH = "/bin/sh"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="only a root worker changes the user of its actions"
)

ESCAPE = (
    "for f in /sys/fs/cgroup/cgroup.procs /sys/fs/cgroup/*/cgroup.procs; do "
    '  [ -e "$f" ] && echo $$ > "$f" 2>/dev/null && echo "moved to $f"; '
    "done; setsid sleep 60 < /dev/null > /dev/null 2>&1 & echo pid $!"
)


def test_commands_of_a_root_worker_run_as_nobody(stub):
    """`id -u` in a host action of a root worker is not 0: the default is nobody/nogroup."""
    run = execute(stub, request([SH, "-c", "id -u; id -g; id -G"]))
    uid, gid, groups = bytes(run.stdout).decode().split("\n")[:3]
    assert uid == "65534" and gid != "0" and "0" not in groups.split()


def test_an_action_cannot_move_itself_out_of_its_cgroup_nor_outlive_the_action(stub):
    """Leftovers are killed, as the docs promise: an unprivileged action cannot leave the cgroup
    that finds them (as root it could: run_as_root says so)."""
    run = execute(stub, request([SH, "-c", ESCAPE]))
    out = bytes(run.stdout).decode()
    assert "moved" not in out, out
    pid = int(re.search(r"pid (\d+)", out).group(1))  # type: ignore[union-attr]
    assert wait_gone(pid), "a process of the action survived it"


def test_the_action_writes_its_directory_and_reads_its_inputs(stub):
    """The action's directories belong to its user; staged inputs are readable but not writable."""
    req = request(
        [
            SH,
            "-c",
            "cat sub/in; mkdir -p sub/new && echo made > sub/new/out; echo x >> sub/in || echo refused",
        ],
        input_files=[pb.InputFile(path="sub/in", content=b"input\n")],
        output_files=["sub/new/out"],
    )
    run = execute(stub, req)
    assert run.status == pb.EXECUTION_STATUS_COMPLETED
    assert bytes(run.stdout) == b"input\nrefused\n"
    assert bytes(run.outputs["sub/new/out"]) == b"made\n"


def test_commands_can_reopen_their_own_output_streams_by_name(stub):
    """`tee /dev/stderr` and `> /dev/stdout` work for an unprivileged command as for the worker's own user."""
    run = execute(stub, request([SH, "-c", "echo hi | tee /dev/stderr > /dev/stdout"]))
    assert bytes(run.stdout) == b"hi\n" and bytes(run.stderr) == b"hi\n"


def test_capabilities_report_the_user_actions_run_as(stub):
    """Operators and schedulers can see that actions do not run as root."""
    caps = stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=10)
    host = next(e for e in caps.executors if e.name == "host")
    assert host.details["euid"] == "65534" and "uid 65534" in host.details["user"]


def test_run_as_root_must_be_said_and_is_reported(start_worker):
    """Running actions as root is an explicit choice, visible in the capabilities."""
    worker = start_worker({"executor": {"host": {"run_as_root": True}}})
    stub = worker.stub()
    assert bytes(execute(stub, request([SH, "-c", "id -u"])).stdout) == b"0\n"
    host = stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=10).executors[0]
    assert host.details["euid"] == "0" and "root" in host.details["user"]


def test_a_work_root_the_action_user_cannot_reach_is_refused_at_start(start_worker, tmp_path):
    """A private work root would make commands fail in ways that look like their own fault."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    with pytest.raises(Exception, match=r"execution\.work_root: .*private.* not searchable by uid 65534"):
        start_worker({"execution": {"work_root": str(private / "work")}})
