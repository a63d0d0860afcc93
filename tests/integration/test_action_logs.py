"""Every log line about an action carries its execution id, whoever logs it."""

from __future__ import annotations

import logging

from _support import execute, request

from expbuild_worker.logging_setup import ExecutionIdFilter


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(ExecutionIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_lines_of_an_action_carry_its_id_and_only_its_id(worker):
    """An operator filtering the log by one execution id sees that action's lines, not another's."""
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        stub = worker.stub()
        execute(stub, request(["/bin/sh", "-c", "echo hi"], execution_id="logs-1"))
        execute(stub, request(["/nonexistent/program"], execution_id="logs-2"))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    finished = {
        r.getMessage().split()[1]: r.execution_id  # type: ignore[attr-defined]
        for r in handler.records
        if r.name == "expbuild_worker.actions"
    }
    assert finished == {"logs-1": "logs-1", "logs-2": "logs-2"}
    for record in handler.records:  # no line names one action while carrying the other's id
        tagged = record.execution_id  # type: ignore[attr-defined]
        if tagged:
            other = "logs-2" if tagged == "logs-1" else "logs-1"
            assert other not in record.getMessage()
