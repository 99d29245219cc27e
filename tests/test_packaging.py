"""Packaging: a non-editable wheel installs into a fresh venv and exposes only ``onnxcomp.*``."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = []


@pytest.mark.slow
def test_wheel_installs_and_runs(tmp_path: Path, repo_root: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(repo_root)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("onnxcomp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("onnxcomp-")}
    assert top == {"onnxcomp"}, f"unexpected top-level entries in the wheel: {top}"
    for sub in ("passes", "calibration", "targets", "commands"):
        assert f"onnxcomp/{sub}/__init__.py" in names
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True)
    out = subprocess.run(
        [str(env_dir / "bin" / "onnxcomp"), "--help"], check=True, capture_output=True, text=True
    )
    assert "optimize" in out.stdout and "inspect" in out.stdout
    probe = "import importlib.util as u; print([u.find_spec(m) is None for m in ('passes','calibration','targets')])"
    res = subprocess.run([str(py), "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert res.stdout.strip() == "[True, True, True]"
    res = subprocess.run(
        [
            str(py),
            "-c",
            "import onnxcomp.passes.cleanup, onnxcomp.targets, onnxcomp.calibration; print('ok')",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    assert res.stdout.strip() == "ok"


def test_no_import_of_top_level_folders(repo_root: Path) -> None:
    """``import passes`` from the repo root would load a second copy of a module: banned everywhere."""
    offenders = []
    for path in repo_root.rglob("*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            s = line.strip()
            if s.startswith(("import passes", "import calibration", "import targets")) or s.startswith(
                ("from passes", "from calibration", "from targets")
            ):
                offenders.append(f"{path.relative_to(repo_root)}: {s}")
    assert offenders == []
