"""Directories that appear complete or not at all: build beside the target, then rename."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output_target(out: Path, overwrite: bool, overwrite_hint: str = "--overwrite") -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty; pass {overwrite_hint} to replace it"
        )


@contextlib.contextmanager
def staged_output_dir(
    out_dir: str | Path, *, overwrite: bool, overwrite_hint: str = "--overwrite"
) -> Iterator[Path]:
    """A fresh hidden directory beside `out_dir`, renamed to `out_dir` when the block succeeds
    and deleted when it raises; an existing `out_dir` is replaced only after the new one is
    complete (and only with overwrite=True)."""
    out = Path(out_dir).expanduser().resolve()
    check_output_target(out, overwrite, overwrite_hint)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would survive the rename
    try:
        yield staging
        check_output_target(out, overwrite, overwrite_hint)  # another writer may have filled it meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            try:
                staging.rename(out)
            except BaseException:
                (old / out.name).rename(out)
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
