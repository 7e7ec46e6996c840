"""A really full disk for tests: a small tmpfs mounted over a directory, where mounting works.

    with small_tmpfs(tmp_path / "disk", size_bytes=2**20) as mounted:
        if not mounted:
            ...  # no mount rights (CI without root): the test simulates ENOSPC instead

Mounting needs root (or CAP_SYS_ADMIN); elsewhere `small_tmpfs` yields False and leaves the
directory as a plain one, so each test decides how to fall back.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["small_tmpfs"]


@contextlib.contextmanager
def small_tmpfs(path: str | Path, *, size_bytes: int) -> Iterator[bool]:
    """Mount a tmpfs of `size_bytes` on `path` (created) for the block; yields whether it is."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if shutil.which("mount"):
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
            capture_output=True,
        )
        mounted = done.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
