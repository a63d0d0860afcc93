"""Fail when expbuild_worker/api/v1 differs from what `make protos` generates now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "expbuild_worker" / "api" / "v1"


def main() -> int:
    before = {p.name: p.read_bytes() for p in GENERATED.glob("*_pb2*")}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py")], check=True)
    after = {p.name: p.read_bytes() for p in GENERATED.glob("*_pb2*")}
    stale = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if stale:
        print(f"generated code is stale; run `make protos` and commit: {', '.join(stale)}", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
