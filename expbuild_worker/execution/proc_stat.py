"""Reading ``/proc/PID/stat``: one parser for every process fact the worker takes from it."""

from __future__ import annotations

STATE, PARENT, START_TIME = 0, 1, 19
"""Indexes into ``stat_fields``: proc(5)'s fields 3 (state), 4 (ppid) and 22 (starttime)."""


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name, or None when the process is gone.

    The name comes in parentheses and may itself hold spaces and parentheses, so the fields
    start after its last closing one; index 0 is proc(5)'s field 3."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()
