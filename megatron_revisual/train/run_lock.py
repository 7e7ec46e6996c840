"""One trainer per output directory: `<dir>/train.lock` holds the host and pid of its trainer.

    lock = RunLock(Path(cfg.output_dir))
    note = lock.acquire()          # OutputDirBusy if another live trainer holds it
    ...
    lock.release()                 # also at exit (atexit), whatever way the run ends

The lock is an exclusive `flock` on the file, which the kernel drops when the holder dies, plus
the record inside (host, pid, start time, command) that a refused trainer prints. A record left
by a dead process on this host (SIGKILL, OOM, a node reboot) is taken over with a message, and
so is one left by an earlier run of the same Slurm job (a requeue: Slurm ends a job's processes
before it starts it again, perhaps on another node). Any other record from another host is not,
because that process cannot be checked from here (the message says which file to delete once
that run is known to be gone). `revisual train` takes the lock of
its output directory, and of `checkpoint.dir` when that lies elsewhere, before it writes anything.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "OutputDirBusy", "RunLock", "claim_run_dirs", "process_alive"]

LOCK_FILE = "train.lock"


class OutputDirBusy(FileExistsError):
    """Another trainer holds the directory's lock; the message names its host and pid."""


def process_alive(pid: int) -> bool:
    """Whether `pid` names a process on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(record: dict[str, Any]) -> str:
    started = record.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    command = f", command: {record['command']}" if record.get("command") else ""
    return f"pid {record.get('pid')} on host {record.get('host')}{when}{command}"


class RunLock:
    """The lock of one directory (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory).expanduser().resolve() / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _read(self, fd: int) -> dict[str, Any] | None:
        raw = os.pread(fd, 65536, 0)
        if not raw.strip():
            return None
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return record if isinstance(record, dict) else {}

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over, else None. Raises
        `OutputDirBusy` naming the holder when a live trainer (or another host's) has it."""
        if self._fd is not None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                record = self._read(fd) or {}
                os.close(fd)
                raise OutputDirBusy(
                    f"{self.path.parent} is in use by another trainer ({_describe(record)}); "
                    f"lock file {self.path}"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released (unlinked) it between our open and flock
                os.close(fd)
                continue
            previous = self._read(fd)
            job = os.environ.get("SLURM_JOB_ID")
            try:
                note = self._take_over(previous, host, job)
            except OutputDirBusy:
                os.close(fd)
                raise
            record = {
                "host": host,
                "pid": os.getpid(),
                "started": time.time(),
                "command": " ".join(sys.argv),
                "slurm_job": job,
            }
            data = (json.dumps(record) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            self._fd = fd
            return note
        raise OutputDirBusy(f"{self.path}: could not take the lock (it kept being replaced)")

    def _take_over(self, previous: dict[str, Any] | None, host: str, job: str | None) -> str | None:
        """What to say when taking over the record found under the flock (None: there was
        none); `OutputDirBusy` when it may belong to a live trainer."""
        if previous is None:
            return None
        if job is not None and previous.get("slurm_job") == job:
            return (f"took over the lock {self.path} of {_describe(previous)}: an earlier run of "
                    f"Slurm job {job}")
        if previous and previous.get("host") != host:
            raise OutputDirBusy(
                f"{self.path.parent} is locked by a trainer on another host ({_describe(previous)}); "
                f"its process cannot be checked from {host}. If that run has ended, delete {self.path}"
            )
        pid = previous.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and process_alive(pid):
            raise OutputDirBusy(
                f"{self.path.parent} is in use by another trainer ({_describe(previous)}); "
                f"lock file {self.path}"
            )
        what = _describe(previous) if previous else "an unreadable record"
        return f"took over the stale lock {self.path} of {what}: that process is gone"

    def release(self) -> None:
        """Delete the lock file and drop the lock (unlink first: whoever opens the name next
        makes a fresh file instead of inheriting this one)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_run_dirs(raw: dict[str, Any]) -> list[RunLock]:
    """Lock a run's output directory (and its checkpoint directory when that lies outside it)
    for this process, released at exit; `raw` is the interpolated YAML config. Prints a line
    for each stale lock taken over."""
    from megatron_revisual.config.schema import RunConfig

    out = Path(raw.get("output_dir") or RunConfig.__dataclass_fields__["output_dir"].default)
    dirs = [out.expanduser().resolve()]
    ckpt_dir = (raw.get("checkpoint") or {}).get("dir")
    if ckpt_dir:
        ckpt = Path(ckpt_dir).expanduser().resolve()
        if not ckpt.is_relative_to(dirs[0]):
            dirs.append(ckpt)
    locks = []
    try:
        for d in dirs:
            lock = RunLock(d)
            note = lock.acquire()
            locks.append(lock)
            if note:
                print(f"revisual train: {note}", file=sys.stderr)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    for lock in locks:
        atexit.register(lock.release)
    return locks
