"""The README's two set-up commands stay true: CI runs the second; this test runs the first."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest


def _commands(repo_root: Path) -> list[str]:
    text = (repo_root / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^(python3 -m venv \.venv .*)$", text, flags=re.M)


def test_readme_starts_with_two_setup_commands(repo_root: Path) -> None:
    cmds = _commands(repo_root)
    assert len(cmds) == 2
    assert "onnxcomp optimize onnxcomp/examples/" in cmds[0]
    assert cmds[1].endswith('pytest -m "not gpu"') and "ruff check ." in cmds[1]
    assert (
        "grep -m1 -E '^python3 -m venv \\.venv .*pytest' README.md" in (repo_root / ".ci" / "run").read_text()
    )


@pytest.mark.slow
def test_readme_example_command_runs_in_a_fresh_checkout(repo_root: Path, tmp_path: Path) -> None:
    """Copy the tracked files, run the README's first command verbatim, check the written model."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=repo_root, capture_output=True, text=True
    )
    checkout = tmp_path / "checkout"
    for rel in files.stdout.split():
        src = repo_root / rel
        if src.is_file():
            (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, checkout / rel)
    cmd = _commands(repo_root)[0]
    res = subprocess.run(["bash", "-c", cmd], cwd=checkout, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    out = checkout / "digits_cnn.int8.onnx"
    onnx.checker.check_model(str(out), full_check=True)
    assert out.stat().st_size < (checkout / "onnxcomp/examples/digits_cnn.onnx").stat().st_size
    assert "cosine" in res.stdout or "fidelity" in res.stdout
