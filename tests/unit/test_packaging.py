"""The wheel carries what the API guide promises: the package, the .proto files and the example configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

SOURCE_ROOT = Path(__file__).resolve().parents[2]
SHARE = "share/expbuild-worker"
BACKEND_FLOOR = 77  # [build-system] requires setuptools>=77


def _backend_installed() -> bool:
    """Whether this interpreter has a setuptools the build backend accepts (no index needed)."""
    try:
        release = version("setuptools")
    except PackageNotFoundError:
        return False
    major = release.split(".", 1)[0]
    return major.isdigit() and int(major) >= BACKEND_FLOOR


def _copy_sources(dest: Path) -> Path:
    """What the build reads, copied: the build leaves its scratch files there, not in the tree."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(SOURCE_ROOT / name, dest / name)
    for name in ("expbuild_worker", "proto", "configs"):
        shutil.copytree(SOURCE_ROOT / name, dest / name, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    src = _copy_sources(tmp_path_factory.mktemp("src"))
    dist = tmp_path_factory.mktemp("dist")
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)]
    if _backend_installed():
        argv[4:4] = ["--no-build-isolation", "--no-index"]  # offline: the installed backend
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        unavailable = "setuptools" in proc.stderr and (
            "No matching distribution" in proc.stderr or "Could not find a version" in proc.stderr
        )
        if unavailable and os.environ.get("CI") != "true":
            pytest.skip("the build backend (setuptools>=77) is not installed and no index answers")
        pytest.fail(f"building the wheel failed:\n{proc.stderr}")
    (built,) = dist.glob("expbuild_worker-*.whl")
    return zipfile.ZipFile(built)


def _data_dir(wheel: zipfile.ZipFile) -> str:
    (data,) = {name.split("/", 1)[0] for name in wheel.namelist() if ".data/" in name}
    return f"{data}/data/{SHARE}"


@pytest.mark.parametrize(
    "pattern", ["proto/**/*.proto", "configs/worker/*.toml"], ids=["protos", "example-configs"]
)
def test_the_wheel_ships_every_proto_and_example_config(wheel: zipfile.ZipFile, pattern: str) -> None:
    """Users of other languages need the .proto files, operators the documented configs, with no clone."""
    expected = sorted(SOURCE_ROOT.glob(pattern))
    assert expected, f"nothing in the source tree matches {pattern}"
    prefix = _data_dir(wheel)
    for path in expected:
        relative = path.relative_to(SOURCE_ROOT).as_posix()
        assert wheel.read(f"{prefix}/{relative}") == path.read_bytes(), relative


def test_the_wheel_has_the_package_and_its_typing_stubs(wheel: zipfile.ZipFile) -> None:
    """The generated stubs and their .pyi files are what a calling service imports."""
    names = set(wheel.namelist())
    for name in (
        "expbuild_worker/py.typed",
        "expbuild_worker/api/v1/worker_pb2.py",
        "expbuild_worker/api/v1/worker_pb2.pyi",
        "expbuild_worker/api/v1/worker_pb2_grpc.py",
    ):
        assert name in names, name
