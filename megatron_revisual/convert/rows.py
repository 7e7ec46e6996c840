"""Conversions that only move whole rows, planned by the mapping itself and done by the kernel.

At TP = 1 every mapping kind rearranges rows: a fused QKV interleaves row blocks of q, k and v,
fc1 stacks gate on up, the vocabulary gains zero rows, norms and linears stay as they are. A row
of a row-major tensor is a contiguous run of bytes, so such a conversion is a list of byte
ranges to copy from one file into another, which `os.copy_file_range` does inside the kernel
(page cache to page cache), without a tensor in this process.

Which rows go where is not restated here: `row_runs` runs the mapping function (`to_megatron`,
`to_hf`) on stand-ins of shape [rows, 1] whose values number the rows, and reads the plan off
the result. A mapping that does more than move rows (a split along columns at TP > 1, a
reshape into more dimensions) fails or changes the stand-in's shape, and `row_runs` returns
None: the caller then converts that tensor through memory.

    runs = row_runs(lambda xs: [to_megatron(rule, xs, ctx, 0)], [4096, 512, 512])
    copy_runs(runs[0], [RowSource(...q...), RowSource(...k...), RowSource(...v...)], out_fd, pos)
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable, Sequence

import torch

ZERO = -1  # RowRun.source of rows that are zeros (vocabulary padding)
_COPY_STEP = 1 << 30  # bytes per copy_file_range call (Linux copies at most ~2 GiB per call)
_ZEROS = bytes(1 << 20)


@dataclasses.dataclass(frozen=True)
class RowRun:
    source: int  # which input, or ZERO
    start: int  # first row in that input
    count: int


@dataclasses.dataclass(frozen=True)
class RowSource:
    """Where the rows of one tensor lie: pieces (path, byte offset, rows) in row order, each
    row `row_bytes` long (a parameter stored as several chunks has several pieces)."""

    pieces: tuple[tuple[str, int, int], ...]
    row_bytes: int

    @staticmethod
    def contiguous(path: str, offset: int, rows: int, row_bytes: int) -> RowSource:
        return RowSource(((path, offset, rows),), row_bytes)

    @property
    def rows(self) -> int:
        return sum(n for _, _, n in self.pieces)


def row_runs(
    mapping: Callable[[list[torch.Tensor]], list[torch.Tensor]], input_rows: Sequence[int]
) -> list[list[RowRun]] | None:
    """The rows each output of `mapping` takes from its inputs (which have `input_rows` rows),
    as runs of consecutive rows; None when `mapping` is not a pure rearrangement of rows."""
    bases, total = [], 0
    for n in input_rows:
        bases.append(total)
        total += n
    # 1 + the row's number over all inputs; 0 stays free for rows the mapping fills with zeros
    ids = torch.arange(1, total + 1, dtype=torch.int64)
    standins = [ids[b : b + n].reshape(n, 1) for b, n in zip(bases, input_rows, strict=True)]
    try:
        outputs = mapping(standins)
    except (ValueError, RuntimeError):  # e.g. a split along dim 1, a reshape into [R, C, T, P, P]
        return None
    plans = []
    for out in outputs:
        if out.dim() != 2 or out.shape[1] != 1 or out.dtype != torch.int64:
            return None
        plans.append(_runs(out.reshape(-1), bases, input_rows))
    return plans


def _runs(ids: torch.Tensor, bases: list[int], input_rows: Sequence[int]) -> list[RowRun]:
    if ids.numel() == 0:
        return []
    source = torch.searchsorted(torch.tensor(bases[1:] + [2**62]), ids - 1, right=True)
    source[ids == 0] = ZERO
    # a run breaks where the source changes or the next row is not the one after
    breaks = torch.ones(ids.numel(), dtype=torch.bool)
    breaks[1:] = (source[1:] != source[:-1]) | ((ids[1:] != ids[:-1] + 1) & (ids[1:] != 0))
    starts = torch.nonzero(breaks).reshape(-1).tolist() + [ids.numel()]
    runs = []
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        src = int(source[a])
        first = 0 if src == ZERO else int(ids[a]) - 1 - bases[src]
        runs.append(RowRun(src, first, b - a))
    return runs


def slice_runs(runs: list[RowRun], start: int, stop: int) -> list[RowRun]:
    """The runs of output rows [start, stop) (a chunk of a parameter)."""
    out, row = [], 0
    for r in runs:
        a, b = max(start, row), min(stop, row + r.count)
        if a < b:
            skip = a - row
            out.append(RowRun(r.source, r.start + (skip if r.source != ZERO else 0), b - a))
        row += r.count
    return out


def byte_ranges(
    runs: list[RowRun], sources: Sequence[RowSource]
) -> list[tuple[str | None, int, int]]:
    """(path or None for zeros, offset, length) of each stretch of bytes, in output order."""
    out: list[tuple[str | None, int, int]] = []
    for run in runs:
        if run.source == ZERO:
            # zero rows are as long as the rows beside them; every source of a rule has one width
            out.append((None, 0, run.count * sources[0].row_bytes))
            continue
        src = sources[run.source]
        row, left = run.start, run.count
        for path, offset, n in src.pieces:
            if row >= n:
                row -= n
                continue
            take = min(n - row, left)
            out.append((path, offset + row * src.row_bytes, take * src.row_bytes))
            left -= take
            row = 0
            if not left:
                break
        if left:
            raise ValueError(
                f"rows {run.start}..{run.start + run.count} are past the {src.rows} rows of the source"
            )
    return out


class FileCopier:
    """Copies byte ranges into an open output file at its current position; keeps the input
    files open between calls (a conversion reads thousands of ranges from a few files)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def copy(self, ranges: list[tuple[str | None, int, int]], out_fd: int) -> int:
        done = 0
        for path, offset, length in ranges:
            if path is None:
                while length:
                    n = os.write(out_fd, _ZEROS[: min(length, len(_ZEROS))])
                    length -= n
                    done += n
                continue
            end = offset + length
            while offset < end:
                n = _copy_some(self._fd(path), out_fd, min(end - offset, _COPY_STEP), offset)
                if n == 0:
                    raise EOFError(f"{path}: ends before byte {end} (needed for a copy)")
                offset += n
                done += n
        return done

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> FileCopier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _copy_some(in_fd: int, out_fd: int, count: int, offset: int) -> int:
    try:
        return os.copy_file_range(in_fd, out_fd, count, offset)
    except OSError as e:
        # EXDEV (another file system on old kernels), EINVAL / ENOSYS / EOPNOTSUPP (a file
        # system or a sandbox without it): the same bytes through a buffer
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(in_fd, min(count, 64 << 20), offset)
    view, n = memoryview(data), 0
    while n < len(data):
        n += os.write(out_fd, view[n:])
    return len(data)
