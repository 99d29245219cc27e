"""Small file helpers shared by everything that writes atomically."""

from __future__ import annotations

import os

__all__ = ["default_file_mode"]


def default_file_mode(path: str | os.PathLike[str]) -> None:
    """Give a ``mkstemp`` file (created 0600) the mode a normal ``open()`` would: 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
