"""Log lines as text or JSON, each line about an action carrying its execution id."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal, TextIO

EXECUTION_ID: ContextVar[str] = ContextVar("expbuild_worker_execution_id", default="")
"""The execution id of the action whose work is being done; set by ``ExecutionIdRunner`` while
the action's runner steps (threads and tasks started meanwhile inherit it)."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(execution_tag)s: %(message)s"

_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "execution_id",
    "execution_tag",
}


class ExecutionIdFilter(logging.Filter):
    """Stamps each record with ``execution_id`` (from ``EXECUTION_ID``; "" outside an action) and
    ``execution_tag`` (`` [<id>]`` or ""). Attached to handlers, so it sees every library's records
    too; it never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        execution_id = getattr(record, "execution_id", "") or EXECUTION_ID.get()
        record.execution_id = execution_id
        record.execution_tag = f" [{execution_id}]" if execution_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, execution_id when
    the line is about an action, any ``extra`` fields, and the traceback as ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        execution_id = getattr(record, "execution_id", "") or EXECUTION_ID.get()
        if execution_id:
            line["execution_id"] = execution_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                line[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(
    level: str, fmt: Literal["text", "json"] = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log line to ``stream`` (default stderr) at ``level`` ("debug" … "error") as
    ``fmt``; replaces the root logger's handlers, so calling it again reconfigures rather than
    duplicating lines. Returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ExecutionIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


__all__ = ["EXECUTION_ID", "ExecutionIdFilter", "JsonFormatter", "configure_logging"]
