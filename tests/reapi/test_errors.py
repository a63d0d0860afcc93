"""How the worker's errors are worded as google.rpc statuses for REAPI clients."""

from __future__ import annotations

import logging

import pytest
from google.rpc import code_pb2, error_details_pb2

from expbuild_worker import errors
from expbuild_worker.frontdoors._remote_actions import error_to_status
from expbuild_worker.model import Digest


def test_missing_blobs_become_precondition_failure_violations() -> None:
    """Clients re-upload exactly the subjects of MISSING violations, so each digest must be one."""
    missing = (Digest.of_bytes(b"a"), Digest.of_bytes(b"bb"))
    status = error_to_status(errors.MissingBlobsError("2 blobs missing", digests=missing))
    assert status.code == code_pb2.FAILED_PRECONDITION
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [
        ("MISSING", f"blobs/{d.sha256}/{d.size}") for d in missing
    ]


def test_detail_size_can_be_bounded() -> None:
    """A status sent as trailing metadata must stay small, or the client cannot read it at all."""
    missing = tuple(Digest.of_bytes(str(i).encode()) for i in range(200))
    status = error_to_status(errors.MissingBlobsError("many", digests=missing), max_detail_bytes=2048)
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    assert 0 < len(failure.violations) < 200
    assert failure.ByteSize() <= 2048


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        ("requests[2].digest.hash: expected 64 hex characters", ["requests[2].digest.hash"]),
        ("blob abc/3: content does not match its digest", []),
        ("no field here", []),
    ],
    ids=["names-a-field", "names-a-blob", "no-colon"],
)
def test_invalid_requests_name_their_field(message: str, fields: list[str]) -> None:
    """A BadRequest field violation appears only when the message really names a field."""
    status = error_to_status(errors.InvalidRequestError(message))
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert status.message == message
    named: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        named += [v.field for v in bad.field_violations]
    assert named == fields


def test_unexpected_errors_are_internal_with_a_logged_id(caplog: pytest.LogCaptureFixture) -> None:
    """A bug shows the client an id to report, never Python internals; the log has the rest."""
    with caplog.at_level(logging.ERROR):
        status = error_to_status(KeyError("secret internals"))
    assert status.code == code_pb2.INTERNAL
    assert "KeyError" not in status.message
    assert "secret" not in status.message
    error_id = status.message.split("error id ")[1].split(";")[0]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFoundError("x"), code_pb2.NOT_FOUND),
        (errors.ResourceExhaustedError("x"), code_pb2.RESOURCE_EXHAUSTED),
        (errors.PreconditionError("x"), code_pb2.FAILED_PRECONDITION),
        (errors.UnavailableError("x"), code_pb2.UNAVAILABLE),
        (errors.AlreadyExistsError("x"), code_pb2.ALREADY_EXISTS),
    ],
    ids=["not-found", "exhausted", "precondition", "unavailable", "exists"],
)
def test_codes_follow_the_error_kind(error: errors.WorkerError, code: int) -> None:
    """Clients retry, re-upload or give up by code, so each kind keeps its code and its message."""
    status = error_to_status(error)
    assert (status.code, status.message) == (code, "x")
