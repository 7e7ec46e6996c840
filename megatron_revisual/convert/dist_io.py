"""The torch_dist format (Megatron-Core dist_checkpointing) read without ever holding a whole
model, and the ranks a conversion runs on.

Reading: `DistCheckpointReader.read(key, offset, shape)` loads the stored chunks that overlap a
region straight from the .distcp files (the .metadata index gives file, offset and length of
each torch.save'd chunk); `row_source` says instead where the region's rows lie in those files,
so that `convert.rows` can copy them without reading them into memory.

Writing: `convert.distcp_write` (one process, TP = PP = 1) and `convert.lazy_save` (the ranks
of a --tp / --pp > 1 save, through Megatron's planner).

Running: `launch` runs a conversion function on the ranks it needs (in this process for one
rank, gloo ranks via `run_distributed` otherwise); ranks compare their input checks with
`agree_on_errors` before writing, so a bad input fails the same way everywhere.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_revisual.convert.rows import RowSource
from megatron_revisual.convert.safetensors_io import ConvertError

# A conversion of a 32B model on slow disks takes a while; a stuck rank still ends eventually.
CONVERT_TIMEOUT_S = 6 * 3600.0


class PositionedStream(io.RawIOBase):
    """A seekable stream whose position is kept here, over `size()` bytes (torch.save and
    torch.load need seek / tell); subclasses read or write at `self.pos`."""

    pos = 0

    def size(self) -> int:
        raise NotImplementedError

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size()}[whence] + offset
        return self.pos


class _FileSlice(PositionedStream):
    """[start, start + length) of an open file as a seekable stream (for torch.load)."""

    def __init__(self, f, start: int, length: int) -> None:  # noqa: ANN001
        self.f, self.start, self.length = f, start, length

    def size(self) -> int:
        return self.length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001
        n = min(len(buffer), self.length - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


class DistCheckpointReader:
    """Tensors of a torch_dist checkpoint read by key and region, one stored chunk at a time."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(ckpt_dir)
        try:
            self.metadata = FileSystemReader(str(self.dir)).read_metadata()
        except FileNotFoundError:
            raise ConvertError(
                f"{self.dir}: no .metadata; not a complete torch_dist checkpoint"
            ) from None
        self.tensors = {
            k: md
            for k, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }
        self._check_files()

    def _check_files(self) -> None:
        """Every data file the .metadata index points at exists and is long enough, so that a
        checkpoint missing a .distcp file (or with a cut one) fails here, by name, before
        anything is read or written."""
        needed: dict[str, int] = {}
        for info in (self.metadata.storage_data or {}).values():
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        problems = []
        for name, end in sorted(needed.items()):
            path = self.dir / name
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif (size := path.stat().st_size) < end:
                problems.append(f"{path} is truncated: {size} bytes, the index needs {end}")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ConvertError(
                f"{self.dir}: incomplete torch_dist checkpoint: {'; '.join(problems[:3])}{more}"
            )

    def _load_record(self, key: str, chunk, map_location: str) -> tuple[Path, int, torch.Tensor]:  # noqa: ANN001
        """(file, record offset, tensor) of a stored chunk; on "meta" only the record's header
        is read, and the storage knows where its bytes start in the record."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        if info.transform_descriptors:
            raise ConvertError(
                f"{self.dir}: {key} is stored with transforms {info.transform_descriptors}; not supported"
            )
        path = self.dir / info.relative_path
        with open(path, "rb") as f:
            t = torch.load(
                _FileSlice(f, info.offset, info.length), map_location=map_location, weights_only=True
            )
        if tuple(t.shape) != tuple(chunk.sizes):
            raise ConvertError(
                f"{path}: chunk of {key} at {list(chunk.offsets)} has shape {list(t.shape)}, "
                f"index says {list(chunk.sizes)}"
            )
        return path, info.offset, t

    def _load_chunk(self, key: str, chunk) -> torch.Tensor:  # noqa: ANN001
        return self._load_record(key, chunk, "cpu")[2]

    def row_source(
        self, key: str, offset: tuple[int, ...], shape: tuple[int, ...], row_axis: int
    ) -> RowSource | None:
        """Where the rows (along `row_axis`) of the region lie in the .distcp files, when every
        stored chunk it overlaps holds whole rows of it as one contiguous block (true of every
        chunk of a TP = 1 save, and of row-split ones at any TP); else None."""
        md = self.tensors[key]
        itemsize = md.properties.dtype.itemsize
        row_bytes = itemsize
        for d in shape[row_axis + 1 :]:
            row_bytes *= d
        lo, hi = offset[row_axis], offset[row_axis] + shape[row_axis]
        pieces = []
        for chunk in md.chunks:
            c_lo, c_n = chunk.offsets[row_axis], chunk.sizes[row_axis]
            a, b = max(lo, c_lo), min(hi, c_lo + c_n)
            others = [d for d in range(len(shape)) if d != row_axis]
            overlaps = a < b and all(
                chunk.offsets[d] < offset[d] + shape[d] and offset[d] < chunk.offsets[d] + chunk.sizes[d]
                for d in others
            )
            if not overlaps:
                continue
            if any(chunk.offsets[d] != offset[d] or chunk.sizes[d] != shape[d] for d in others):
                return None  # split along another axis (a row-parallel weight at TP > 1)
            path, record, t = self._load_record(key, chunk, "meta")
            storage = t.untyped_storage()
            if t.storage_offset() or not t.is_contiguous() or storage.nbytes() != t.numel() * itemsize:
                return None
            start = record + storage._checkpoint_offset + (a - c_lo) * row_bytes
            pieces.append((a, str(path), start, b - a))
        pieces.sort()
        row = lo
        for a, _, _, n in pieces:
            if a != row:
                return None
            row += n
        if row != hi:
            return None
        return RowSource(tuple((path, start, n) for _, path, start, n in pieces), row_bytes)

    def read(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        md = self.tensors[key]
        for chunk in md.chunks:
            if tuple(chunk.offsets) == tuple(offset) and tuple(chunk.sizes) == tuple(shape):
                return self._load_chunk(key, chunk)  # the common case: no copy
        out = torch.empty(shape, dtype=md.properties.dtype)
        covered = 0
        for chunk in md.chunks:
            lo = [max(o, c) for o, c in zip(offset, chunk.offsets, strict=True)]
            hi = [
                min(o + s, c + cs)
                for o, s, c, cs in zip(offset, shape, chunk.offsets, chunk.sizes, strict=True)
            ]
            if any(a >= b for a, b in zip(lo, hi, strict=True)):
                continue
            src = self._load_chunk(key, chunk)
            dst_idx = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset, strict=True))
            src_idx = tuple(
                slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets, strict=True)
            )
            out[dst_idx] = src[src_idx]
            covered += int(torch.tensor([b - a for a, b in zip(lo, hi, strict=True)]).prod())
            del src
        if covered != out.numel():
            raise ConvertError(
                f"{self.dir}: the stored chunks of {key} cover {covered} of {out.numel()} elements at {list(offset)}"
            )
        return out


# ---------------------------------------------------------------- running the conversion ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    fn: Callable[..., Any],
    *,
    tp: int,
    pp: int,
    args: tuple = (),
    timeout_s: float = CONVERT_TIMEOUT_S,
) -> list[Any]:
    """Run `fn(*args)` on tp*pp ranks with Megatron's parallel state: in this process for a
    single rank, else on gloo ranks via `run_distributed`; returns the per-rank results. The
    first rank to fail stops them all; its ConvertError is re-raised here as a ConvertError."""
    from megatron_revisual.parallel import (
        RankError,
        destroy_parallel,
        initialize_parallel,
        run_distributed,
    )

    if tp * pp == 1:
        if dist.is_initialized():
            raise RuntimeError("launch() needs a process without torch.distributed initialized")
        env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            initialize_parallel(tp=1, pp=1)
            try:
                return [fn(*args)]
            finally:
                destroy_parallel()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    try:
        return run_distributed(fn, world_size=tp * pp, tp=tp, pp=pp, args=args, timeout_s=timeout_s)
    except RankError as e:
        named = e.named_error(ConvertError)  # bad input, found by a rank: its message, no traceback
        if named is not None:
            raise named from None
        raise


def agree_on_errors(errors: list[str]) -> None:
    """Every rank raises the same ConvertError if any rank found a problem (before any write)."""
    gathered: list[list[str]] = [errors]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, errors)
    merged = sorted({e for errs in gathered for e in errs})
    if merged:
        more = f"\n  ... and {len(merged) - 10} more" if len(merged) > 10 else ""
        raise ConvertError("\n".join(merged[:10]) + more)
