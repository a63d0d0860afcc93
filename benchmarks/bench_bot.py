"""Scale-out through BuildGrid: Bazel wall time with 1 and 2 bots, beside the worker's own REAPI endpoint.

Prints, measured in this run on this machine:

1. Bazel's wall time for the scale-out workspace (20 independent genrules that each sleep
   ``--sleep`` seconds, plus a chain of 4), cold, built through BuildGrid 0.4.4 with one bot and
   with two bots (capacity ``--capacity`` each), and through the worker's own REAPI endpoint with
   the same number of slots as one bot (the baseline: no scheduler in between). Each round's
   commands carry a fresh salt, so every action executes; each Bazel run is ``--batch`` in a
   fresh output base (its JVM start-up is included, alike for every row).
2. The per-action overhead the bot adds over the engine: lease received → result acknowledged
   by the scheduler, minus the command's own run time, read from the bots' logs (mean and
   largest), for every action of the bot rounds.

Needs what the BuildGrid tests need (scripts/ensure-buildgrid.sh, Debian's PostgreSQL, bazel).
Everything binds 127.0.0.1 and is stopped at the end. Exit status is 0 whether or not anything
is fast: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "buildgrid"))

from _gridkit import (
    INSTANCE,
    Bazel,
    BotProcess,
    BuildGrid,
    Postgres,
    expected_outputs,
    missing_requirements,
    workspace_build,
)

INDEPENDENT = 20
CHAIN = 4


def _timed_build(bazel_binary: str, root: Path, target: str, sleep: float) -> float:
    bazel = Bazel(bazel_binary, root, workspace_build(INDEPENDENT, CHAIN, sleep=sleep, salt=uuid.uuid4().hex))
    started = time.monotonic()
    code, output = bazel.run(target)
    elapsed = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"bazel failed (exit {code}):\n{output[-4000:]}")
    expected = expected_outputs(INDEPENDENT, CHAIN)
    if bazel.outputs(list(expected)) != expected:
        raise SystemExit("outputs differ from the expected bytes")
    return elapsed


def _reapi_worker(root: Path, slots: int) -> tuple[subprocess.Popen[str], str]:
    """The worker serving its own REAPI endpoint (instance "main"), with ``slots`` action slots."""
    config = root / "reapi.toml"
    config.write_text(
        f'[server]\nworker_id = "bench-reapi-{uuid.uuid4().hex[:8]}"\nport = 0\nlog_level = "warning"\n'
        f'[execution]\nwork_root = "{root / "reapi-work"}"\nmax_concurrent_executions = {slots}\n'
        f'[reapi]\ninstance_name = "{INSTANCE}"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "expbuild_worker", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"listening on (\S+)", line)
    if found is None:
        proc.kill()
        raise SystemExit(f"the worker did not start: {line!r}")
    return proc, found.group(1)


def _overheads(bots: list[BotProcess]) -> list[float]:
    found: list[float] = []
    for bot in bots:
        found += [
            float(x) for x in re.findall(r"reported: status 0, .*bot overhead ([0-9.]+)s", bot.log_text())
        ]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="cold builds per configuration (default 2)")
    parser.add_argument("--capacity", type=int, default=2, help="leases per bot (default 2)")
    parser.add_argument(
        "--sleep", type=float, default=1.0, help="seconds each leaf action sleeps (default 1)"
    )
    args = parser.parse_args()
    reason = missing_requirements()
    bazel_binary = shutil.which("bazel")
    if reason is not None or bazel_binary is None:
        print(f"skipped: {reason or 'no bazel on PATH'}")
        return 0
    root = Path(tempfile.mkdtemp(prefix="expbuild-bench-bot-"))
    root.chmod(0o755)  # the database's user and the action user reach their directories
    db = Postgres(root / "postgres")
    grid = BuildGrid(root / "grid", db)
    bots: list[BotProcess] = []
    worker: subprocess.Popen[str] | None = None
    rows: list[tuple[str, list[float]]] = []
    try:
        db.start()
        grid.start()
        worker, target = _reapi_worker(root, args.capacity)
        times = [
            _timed_build(bazel_binary, root / f"reapi-{i}", target, args.sleep) for i in range(args.rounds)
        ]
        rows.append((f"worker's own REAPI endpoint, {args.capacity} slots", times))
        for count in (1, 2):
            while len(bots) < count:
                bot = BotProcess(root / "bots", f"bench-bot-{len(bots)}", grid.target, capacity=args.capacity)
                bot.start()
                bot.wait_joined()
                bots.append(bot)
            times = [
                _timed_build(bazel_binary, root / f"grid-{count}-{i}", grid.target, args.sleep)
                for i in range(args.rounds)
            ]
            rows.append((f"BuildGrid, {count} bot(s) x capacity {args.capacity}", times))
    finally:
        for bot in bots:
            bot.stop()
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        grid.stop()
        db.stop()
    print(f"Bazel, {INDEPENDENT} independent genrules (sleep {args.sleep}s each) + a chain of {CHAIN}, cold:")
    baseline = statistics.median(rows[0][1])
    for label, times in rows:
        median = statistics.median(times)
        shown = ", ".join(f"{t:.1f}" for t in times)
        print(
            f"  {label:<45} median {median:6.2f}s  ({shown})  x{median / baseline:.2f} of the REAPI endpoint"
        )
    overheads = _overheads(bots)
    if overheads:
        print(
            f"bot overhead per action (lease received -> result acknowledged, minus the command): "
            f"mean {statistics.mean(overheads) * 1000:.0f} ms, largest {max(overheads) * 1000:.0f} ms "
            f"over {len(overheads)} actions"
        )
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
