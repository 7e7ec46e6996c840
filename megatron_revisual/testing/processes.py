"""The process table as tests see it (Linux /proc): who descends from whom, who is still alive.

    before = descendants(trainer.pid)            # {(pid, start time), ...}
    os.killpg(trainer.pid, signal.SIGKILL)
    assert wait_gone(before, timeout_s=10) == set()

A process is identified by (pid, start time) so that a recycled pid never counts as a survivor;
zombies count as gone (they hold no memory and no port).
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["Proc", "alive", "command_line", "descendants", "wait_gone"]

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of `pid`, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ")"
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> set[Proc]:
    """Every living process below `pid` in the process tree (children, grandchildren, ...)."""
    children: dict[int, list[Proc]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None and stat[1] != "Z":
            children.setdefault(stat[0], []).append((int(entry.name), stat[2]))
    found: set[Proc] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child[0])
    return found


def alive(procs: set[Proc]) -> set[Proc]:
    """The members of `procs` still running (same pid and start time, not a zombie)."""
    out = set()
    for pid, start in procs:
        stat = _stat(pid)
        if stat is not None and stat[2] == start and stat[1] != "Z":
            out.add((pid, start))
    return out


def wait_gone(procs: set[Proc], timeout_s: float) -> set[Proc]:
    """Wait until none of `procs` runs; returns those still running after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    left = alive(procs)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = alive(left)
    return left


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"
