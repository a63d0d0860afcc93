"""Log lines as text or JSON, each line about an action carrying its execution id."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from expbuild_worker.logging_setup import EXECUTION_ID, configure_logging


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_are_one_object_each_with_the_execution_id(root_logger):
    """A log pipeline parses each line alone and finds every line of one action by its id."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = logging.getLogger("expbuild_worker.test")
    token = EXECUTION_ID.set("exec-7")
    try:
        log.info("staging %d files", 3, extra={"executor": "host"})
    finally:
        EXECUTION_ID.reset(token)
    log.warning("between actions")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "staging 3 files" and first["execution_id"] == "exec-7"
    assert (first["level"], first["logger"], first["executor"]) == ("INFO", "expbuild_worker.test", "host")
    assert "execution_id" not in second
    assert "ValueError: boom" in third["exception"]


def test_text_lines_tag_the_execution_id(root_logger):
    """In the text format too, a line about an action names it, and others carry no empty tag."""
    out = io.StringIO()
    configure_logging("debug", "text", stream=out)
    log = logging.getLogger("expbuild_worker.test")
    token = EXECUTION_ID.set("exec-8")
    try:
        log.debug("running")
    finally:
        EXECUTION_ID.reset(token)
    log.debug("idle")
    running, idle = out.getvalue().splitlines()
    assert running.endswith("DEBUG expbuild_worker.test [exec-8]: running")
    assert idle.endswith("DEBUG expbuild_worker.test: idle")


def test_configuring_again_replaces_rather_than_duplicates(root_logger):
    """Reconfiguring (a test, an embedding program) must not print every line twice."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "text", stream=first)
    configure_logging("warning", "json", stream=second)
    logging.getLogger("expbuild_worker.test").warning("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1
