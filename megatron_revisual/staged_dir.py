"""Directories that appear complete or not at all: build beside the target, then rename; a
write that fails for lack of space is reported as `OutputWriteError` naming the output."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OutputWriteError", "check_output_target", "output_write_error", "staged_output_dir", "write_file_atomic"]

_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# Other errors that only a write gives (a missing input file is not the output's fault)
_WRITE_ERRNOS = {errno.EFBIG, errno.EIO, errno.EROFS}
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")
# torch's zip writer (torch.save, distributed checkpoint files) drops the errno: "[enforce fail
# at inline_container.cc:672] . unexpected pos 704 vs 598", "... file write failed"; whether the
# disk is full is then read from the file system. megatron-core 0.19's async file writer only
# logs its worker's error and raises "Worker failure: An error is caught while starting worker 0,
# error: <class 'RuntimeError'>" (filesystem_async.py), so that text means the same.
_WRITE_FAILED_TEXT = (
    "enforce fail at inline_container.cc",
    "PytorchStreamWriter failed writing",
    "An error is caught while starting worker",
)


class OutputWriteError(OSError):
    """An output could not be written (disk full, quota, I/O error); names the path."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28] " prefix
        return self.strerror or super().__str__()


def _related(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and what torch.distributed.checkpoint's
    CheckpointException collected from the ranks."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return None


def output_write_error(exc: BaseException, path: str | Path) -> OutputWriteError | None:
    """The named error for a failed write of `path`, or None when `exc` is not a write failure:
    "no space left on device while writing PATH" when the disk (or quota) is full, else
    "<the error> while writing PATH" for other errors only a write gives (EFBIG, EIO, EROFS)."""
    path = Path(path)
    related = list(_related(exc))
    texts = [str(e) + str(getattr(e, "remote_traceback", "")) for e in related]
    no_space = any(isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS for e in related) or any(
        marker in text for text in texts for marker in _NO_SPACE_TEXT
    )
    stream_failed = any(marker in text for text in texts for marker in _WRITE_FAILED_TEXT)
    if stream_failed and not no_space:
        free = _free_bytes(path)
        no_space = free is not None and free < 2**20
    if no_space:
        return OutputWriteError(errno.ENOSPC, f"no space left on device while writing {path}")
    os_errors = [e for e in related if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS]
    if os_errors:
        e = os_errors[0]
        return OutputWriteError(e.errno, f"{e.strerror or e} while writing {path}")
    return None


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
    except BaseException as e:
        named = output_write_error(e, out)
        shutil.rmtree(staging, ignore_errors=True)
        if named is not None and not isinstance(e, OutputWriteError):
            raise named from e
        raise


def write_file_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` whole or keeps what it held: written and fsynced beside it, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
