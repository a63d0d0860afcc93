"""Disk and log limits through a real server and channel, as the composition root wires them."""

from __future__ import annotations

from _support import action_leftovers, execute, request
from google.protobuf.duration_pb2 import Duration

from expbuild_worker.api.v1 import worker_pb2 as pb

SH = "/bin/sh"
MiB = 1 << 20
FILL = "while :; do head -c 1048576 /dev/urandom >> fill || exit 3; done"
"""Appends to ./fill forever, a MiB at a time."""


def test_action_filling_the_disk_ends_disk_limit_exceeded_and_leaves_nothing(start_worker):
    """An action writing past limits.disk_bytes is stopped long before its 60 s timeout, says why,
    and its directory (the bytes it wrote) is gone afterwards."""
    worker = start_worker({"execution": {"disk_check_interval_seconds": 0.1}})
    run = execute(
        worker.stub(),
        request(
            [SH, "-c", FILL],
            limits=pb.ResourceLimits(disk_bytes=16 * MiB),
            timeout=Duration(seconds=60),
        ),
    )
    assert run.status == pb.EXECUTION_STATUS_DISK_LIMIT_EXCEEDED
    assert "more than limits.disk_bytes (16777216 bytes)" in run.result.message
    assert action_leftovers(worker.config.execution.work_root) == []


def test_sparse_file_does_not_trip_the_disk_limit(start_worker):
    """Only blocks really on disk count: a 10 GiB sparse file under a 16 MiB limit completes."""
    worker = start_worker({"execution": {"disk_check_interval_seconds": 0.05}})
    run = execute(
        worker.stub(),
        request(
            [SH, "-c", "truncate -s 10G sparse && sleep 0.3 && echo ok"],
            limits=pb.ResourceLimits(disk_bytes=16 * MiB),
        ),
    )
    assert run.status == pb.EXECUTION_STATUS_COMPLETED and run.result.exit_code == 0
    assert bytes(run.stdout) == b"ok\n"


def test_disk_limit_is_listed_as_enforced(worker):
    """Clients choose executors by what they enforce: the host executor's directory is watched."""
    caps = worker.stub().GetCapabilities(pb.GetCapabilitiesRequest())
    host = next(e for e in caps.executors if e.name == "host")
    assert pb.RESOURCE_LIMIT_DISK in host.enforced_limits


def test_end_action_policy_ends_a_runaway_log(start_worker):
    """With execution.on_log_limit = "end-action" an action whose log passes the cap ends
    OUTPUT_LIMIT_EXCEEDED at once, not at its 60 s timeout, with what was streamed."""
    worker = start_worker({"execution": {"max_log_bytes_per_stream": 100_000, "on_log_limit": "end-action"}})
    run = execute(worker.stub(), request(["/usr/bin/yes"], timeout=Duration(seconds=60)))
    assert run.status == pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED
    assert len(run.stdout) == 100_000 and run.result.stdout.truncated
    assert (
        "stdout reached the log cap of 100000 bytes (execution.max_log_bytes_per_stream)"
        in run.result.message
    )
    assert action_leftovers(worker.config.execution.work_root) == []


def test_truncate_policy_completes_a_command_a_little_over_the_cap(start_worker):
    """The default policy holds only runaway output: a command a little over the cap that exits
    completes, with every byte counted."""
    worker = start_worker({"execution": {"max_log_bytes_per_stream": 100_000}})
    run = execute(
        worker.stub(), request([SH, "-c", "head -c 400000 /dev/zero"], timeout=Duration(seconds=60))
    )
    assert run.status == pb.EXECUTION_STATUS_COMPLETED
    assert run.result.stdout.size_bytes == 400_000 and len(run.stdout) == 100_000
