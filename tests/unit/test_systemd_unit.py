"""The shipped systemd unit is one systemd accepts as written, with the hardening the docs promise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from _support import unavailable

UNIT = Path(__file__).resolve().parents[2] / "configs" / "systemd" / "expbuild-worker.service"
INSTALLED_COMMAND = "/opt/expbuild-worker/bin/expbuild-worker"


def _settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """A typo in a hardening key is only a warning at boot: verify must print nothing at all."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable(
            "systemd-analyze is not installed (Debian package: systemd)", flag="EXPBUILD_REQUIRE_SYSTEMD"
        )
    # verify checks that ExecStart's program exists: point it at a stand-in of the installed one.
    command = tmp_path / "expbuild-worker"
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED_COMMAND} ") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={INSTALLED_COMMAND} ", f"ExecStart={command} "))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_the_unit_keeps_cgroups_writable_and_is_hardened() -> None:
    """Per-action cgroups need a writable cgroup tree; the rest of the system stays read-only."""
    settings = _settings()
    assert "ProtectControlGroups" not in settings
    assert "/sys/fs/cgroup" in settings["ReadWritePaths"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "KillMode": "mixed",
    }.items():
        assert settings[key] == [value], key
