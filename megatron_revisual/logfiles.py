"""Where a process's output goes: the console for the lines a user reads, files for the rest.

A training rank, and the rollout engine it starts, print far more than progress: Megatron-Core,
torch and vLLM log at import, at start-up and per request, from Python and from C++. Filtering
each message would never end, so everything a process writes to its stdout and stderr (file
descriptors 1 and 2, which C++ and child processes write to as well) goes to a log file, and the
lines meant for the user are written to `console()`, a stream on the terminal the process had
before the redirect.

    console = redirect_stdio(out / "logs" / "rank0.log")   # no-op when REVISUAL_VERBOSE=1
    print("[mrl] 3/50 ...", file=console)

`revisual train --verbose` sets REVISUAL_VERBOSE=1, which keeps every process on the console.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TextIO

__all__ = ["console", "ignore_known_warnings", "redirect_stdio", "verbose", "warnings_to_console"]

VERBOSE_ENV = "REVISUAL_VERBOSE"
_console: TextIO | None = None


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def console() -> TextIO:
    """The stream for the user's lines: the pre-redirect stderr, or sys.stderr without one."""
    return _console if _console is not None else sys.stderr


def redirect_stdio(path: str | Path) -> TextIO:
    """Append this process's fd 1 and 2 to `path` (parent directories made) and return
    `console()`. Children started afterwards inherit the redirect. Calling it again moves the
    output to the new file and keeps the first console. In verbose mode nothing moves."""
    global _console
    if verbose():
        return console()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if _console is None:
        # line-buffered: a progress line must reach the terminal when it is printed
        _console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    return _console


class _ConsoleHandler(logging.Handler):
    """Writes to whatever `console()` is when the record arrives."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=console(), flush=True)
        except Exception:  # a logging handler must not raise into the code that logged
            self.handleError(record)


def warnings_to_console(logger: str = "megatron_revisual") -> None:
    """Also show `logger`'s warnings and errors on the console (the user must see that rows were
    skipped or that a config does less than it says); its INFO lines stay in the log file. Call
    once, on one rank: every rank logs the same data warnings."""
    if verbose():  # the process's own stderr is the console already
        return
    log = logging.getLogger(logger)
    if any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        return
    handler = _ConsoleHandler(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)


# Warnings that libraries raise about themselves and that nothing in a run can change; each
# would repeat in every rank's log. (message regex, category, why it cannot be acted on)
_KNOWN_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", UserWarning,
     "CPU runs: TE and apex need CUDA, so Megatron's torch fallbacks are the intended path"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
     "raised inside Megatron-Core's dist_checkpointing, which still builds ShardedTensors"),
    (r".*\.grad attribute of a Tensor that is not a leaf", UserWarning,
     "Megatron's DDP reads .grad of its non-leaf views of the gradient buffer"),
)


def ignore_known_warnings(*, on_gpu: bool) -> None:
    """Silence `_KNOWN_WARNINGS` in this process (the TE/apex notice only without a GPU, where
    it is expected; on a GPU node it means a broken install and stays)."""
    import warnings

    for message, category, _why in _KNOWN_WARNINGS:
        if on_gpu and message.startswith("Transformer Engine"):
            continue
        warnings.filterwarnings("ignore", message=message, category=category)
