"""The runnable examples in examples/ work against a real worker, as the API guide says they do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import expbuild_worker

SOURCE_ROOT = Path(expbuild_worker.__file__).resolve().parents[1]
EXAMPLES = SOURCE_ROOT / "examples"


def test_scheduler_client_example(worker_target: str, tmp_path: Path) -> None:
    """The guide's example runs end to end: upload, execute, logs, outputs, refusal, cancel, ReadBlob."""
    env = dict(os.environ, PYTHONPATH=str(SOURCE_ROOT))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "scheduler_client.py"), "--target", worker_target],
        capture_output=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "executor host: ISOLATION_LEVEL_HOST, ready=True" in out
    assert "EXECUTION_STATUS_COMPLETED, exit code 3" in out
    assert "refused: INVALID_ARGUMENT" in out
    assert ": EXECUTION_STATUS_CANCELLED" in out
    assert out.endswith("all as promised\n")
