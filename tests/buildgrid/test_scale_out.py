"""The worker as BuildGrid's bots: Bazel builds through the scheduler, byte-exact, on every bot."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from _gridkit import Bazel, BuildGrid, expected_outputs, wait_bazel, workspace_build


def _build_ok(bazel: Bazel, grid: BuildGrid) -> str:
    code, output = bazel.run(grid.target)
    assert code == 0, f"bazel failed (exit {code}):\n{output[-6000:]}"
    return output


def test_two_bots_share_a_build_and_every_output_is_byte_exact(grid, bots, bazel_binary, tmp_path: Path):
    """N workers behind one scheduler is the point of scale-out: both take work, outputs are exact."""
    first, second = bots("one"), bots("two")
    first.wait_joined()
    second.wait_joined()
    bazel = Bazel(bazel_binary, tmp_path / "bazel", workspace_build(independent=20, chain=4))
    output = _build_ok(bazel, grid)
    expected = expected_outputs(independent=20, chain=4)
    assert bazel.outputs(list(expected)) == expected
    # Another test on the same scheduler may have built an identical action first: the scheduler
    # then answers it from its action cache, and Bazel counts it as a cache hit.
    hit = re.search(r"(\d+) remote cache hit", output)
    ran = len(expected) - (int(hit.group(1)) if hit else 0)
    # A bot logs a result once the scheduler has acknowledged it, which can come after Bazel
    # already saw the build finish: give the last acknowledgements a moment to arrive.
    deadline = time.monotonic() + 30
    while len(first.reported()) + len(second.reported()) < ran and time.monotonic() < deadline:
        time.sleep(0.2)
    one, two = len(first.reported()), len(second.reported())
    assert one > 0 and two > 0, f"actions per bot: {one} and {two}"
    assert one + two >= ran, f"every action that ran, ran on one of the bots: {one} + {two} of {ran}"


def test_a_bot_killed_mid_build_leaves_its_work_to_the_other(grid, bots, bazel_binary, tmp_path: Path):
    """A machine that dies takes no action with it: the scheduler re-leases its work, the build finishes."""
    doomed, survivor = bots("doomed"), bots("survivor")
    doomed.wait_joined()
    survivor.wait_joined()
    bazel = Bazel(bazel_binary, tmp_path / "bazel", workspace_build(independent=20, chain=2, sleep=2))
    build = bazel.build(grid.target)
    deadline = time.monotonic() + 120
    while doomed.running_leases() < 1 and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert doomed.running_leases() >= 1, "the doomed bot never got work"
    doomed.kill()
    code, output = wait_bazel(build)
    assert code == 0, f"bazel failed (exit {code}):\n{output[-6000:]}"
    expected = expected_outputs(independent=20, chain=2)
    assert bazel.outputs(list(expected)) == expected
    assert len(survivor.reported()) > 0


def test_a_container_action_lands_only_on_the_bot_offering_its_image(
    grid, bots, bazel_binary, container_image, tmp_path: Path
):
    """An action asking for an image must run in that image, so only a bot that offers it may take it."""
    plain = bots("plain")
    boxed = bots("boxed", docker_image=container_image)
    plain.wait_joined()
    boxed.wait_joined()
    bazel = Bazel(
        bazel_binary, tmp_path / "bazel", workspace_build(independent=6, chain=1, sleep=0, container=True)
    )
    _build_ok(bazel, grid)
    expected = expected_outputs(independent=6, chain=1, container=True)
    assert bazel.outputs(list(expected)) == expected
    assert boxed.log_text().count("on executor docker") == 1
    assert "on executor docker" not in plain.log_text()


def test_the_bot_rejoins_a_restarted_scheduler_by_itself(grid, bots, bazel_binary, tmp_path: Path):
    """A scheduler restart is routine operations: an idle bot must come back without anyone touching it."""
    bot = bots("steady")
    bot.wait_joined()
    before = Bazel(bazel_binary, tmp_path / "before", workspace_build(independent=2, chain=1, sleep=0))
    _build_ok(before, grid)
    grid.stop()
    time.sleep(2)  # the bot meets a closed port for a while
    grid.start()
    reported = len(bot.reported())
    after = Bazel(bazel_binary, tmp_path / "after", workspace_build(independent=3, chain=1, sleep=0.1))
    _build_ok(after, grid)
    expected = expected_outputs(independent=3, chain=1)
    assert after.outputs(list(expected)) == expected
    deadline = time.monotonic() + 30  # acknowledgements may trail the build's end, as above
    while len(bot.reported()) <= reported and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(bot.reported()) > reported, "the restarted scheduler's work ran on the bot"
    assert bot.proc is not None and bot.proc.poll() is None, "the bot never crashed"


def test_sigterm_leaves_the_scheduler_cleanly(grid, bots):
    """Stopping a bot is a normal event: it closes its session and exits 0 rather than dying mid-call."""
    bot = bots("leaving")
    bot.wait_joined()
    assert bot.stop(signal.SIGTERM) == 0
    assert "stopped" in bot.log_text()


def test_sigterm_mid_build_hands_unfinished_leases_back(grid, bots, bazel_binary, tmp_path: Path):
    """A bot taken down for maintenance must not strand work: what it cannot finish runs elsewhere."""
    leaving = bots("leaving-busy", grace_seconds=0.5)
    staying = bots("staying")
    leaving.wait_joined()
    staying.wait_joined()
    bazel = Bazel(bazel_binary, tmp_path / "bazel", workspace_build(independent=8, chain=1, sleep=3))
    build = bazel.build(grid.target)
    deadline = time.monotonic() + 120
    while leaving.running_leases() < 1 and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leaving.running_leases() >= 1, "the leaving bot never got work"
    assert leaving.stop(signal.SIGTERM) == 0
    assert "handed back by the bot" in leaving.log_text()
    code, output = wait_bazel(build)
    assert code == 0, f"bazel failed (exit {code}):\n{output[-6000:]}"
    expected = expected_outputs(independent=8, chain=1)
    assert bazel.outputs(list(expected)) == expected
