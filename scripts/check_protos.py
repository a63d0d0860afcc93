"""Fail when expbuild_worker/api/{v1,reapi,rwapi} differ from what `make protos` generates now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = (
    ROOT / "expbuild_worker" / "api" / "v1",
    ROOT / "expbuild_worker" / "api" / "reapi",
    ROOT / "expbuild_worker" / "api" / "rwapi",
)


def snapshot() -> dict[str, bytes]:
    return {
        str(path.relative_to(ROOT)): path.read_bytes()
        for directory in GENERATED
        for path in directory.glob("*_pb2*")
    }


def main() -> int:
    before = snapshot()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py")], check=True)
    after = snapshot()
    stale = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if stale:
        print(f"generated code is stale; run `make protos` and commit: {', '.join(stale)}", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
