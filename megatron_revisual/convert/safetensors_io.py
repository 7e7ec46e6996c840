"""The safetensors format read and written one tensor at a time, with errors that name the file.

`safetensors.safe_open` maps a whole file and materialises tensors from the mapping, which puts
the mapped pages in the process's resident set; a converter streaming a 60 GB checkpoint wants
neither that nor a 5 GB shard assembled in memory before `save_file`. The format is simple
(8-byte little-endian header length, a JSON header with dtype, shape and [begin, end) data
offsets, then the raw bytes), so here:

- `HFCheckpoint` parses every header of a Hugging Face directory up front (catching truncated
  or corrupt files before any work is done) and reads each tensor with one `readinto` into a
  freshly allocated tensor;
- `StreamingSafetensorsWriter` knows every name, shape and dtype in advance, splits them into
  shards of bounded size, writes each header first and then the tensors' bytes as they arrive.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_revisual.convert.rows import FileCopier

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Hugging Face's "5GB" (decimal), the Hub's limit per file.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Headers above this are not safetensors files written by anyone sane (safetensors caps at 100 MB).
_MAX_HEADER_BYTES = 100 * 2**20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without going through numpy (`.numpy()`
    marks the storage non-resizable, which the converter's early release of memory needs)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("byte_view needs a contiguous CPU tensor")
    nbytes = t.numel() * t.element_size()
    return (
        memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")
        if nbytes
        else memoryview(b"")
    )


class ConvertError(ValueError):
    """Bad input to a conversion; the message names the file or tensor and what was expected."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """The parsed header of one .safetensors file; `read` returns one tensor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise ConvertError(f"{self.path}: file not found") from None
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ConvertError(
                    f"{self.path}: truncated: {size} bytes, not even the 8-byte header length"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES:
                raise ConvertError(
                    f"{self.path}: header length {header_len} is not plausible; not a safetensors file"
                )
            if 8 + header_len > size:
                raise ConvertError(
                    f"{self.path}: truncated: {size} bytes on disk, but the header alone needs {8 + header_len}"
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(
                f"{self.path}: header is not valid JSON ({e}); not a safetensors file"
            ) from None
        self.data_start = 8 + header_len
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        data_end = 0
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConvertError(
                    f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}"
                ) from None
            want = math.prod(shape) * dtype.itemsize
            if end - begin != want:
                raise ConvertError(
                    f"{self.path}: tensor {name!r} spans {end - begin} bytes; "
                    f"{entry['dtype']} {list(shape)} needs {want}"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, begin, end)
            data_end = max(data_end, end)
        if self.data_start + data_end > size:
            last = max(self.tensors.values(), key=lambda t: t.end)
            raise ConvertError(
                f"{self.path}: truncated: {size} bytes on disk, but the header describes "
                f"{self.data_start + data_end} (tensor {last.name!r} ends at byte {self.data_start + last.end})"
            )

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = byte_view(buf)
        # A plain read into our own buffer: nothing of the file stays mapped into this process.
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + info.begin)
            done = 0
            while done < info.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise ConvertError(
                        f"{self.path}: truncated while reading tensor {name!r} ({done} of {info.nbytes} bytes)"
                    )
                done += n
        return buf.view(info.dtype).reshape(info.shape)


class HFCheckpoint:
    """The weights of a Hugging Face directory (model.safetensors or a sharded index), by name."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(
                    f"{index}: not a safetensors index (needs a 'weight_map'): {e}"
                ) from None
            self.source = index
        elif (self.dir / SINGLE_FILE).exists():
            weight_map = {}
            self.source = self.dir / SINGLE_FILE
        elif not self.dir.is_dir():
            raise ConvertError(f"{self.dir}: not a directory")
        else:
            raise ConvertError(
                f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"
            )
        files = sorted(set(weight_map.values())) or [SINGLE_FILE]
        self.files = {f: SafetensorsFile(self.dir / f) for f in files}
        if not weight_map:
            weight_map = dict.fromkeys(self.files[SINGLE_FILE].tensors, SINGLE_FILE)
        for name, file in weight_map.items():
            if name not in self.files[file].tensors:
                raise ConvertError(
                    f"{index}: maps tensor {name!r} to {file}, whose header does not hold it"
                )
        self.weight_map = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.files[self.weight_map[name]].tensors[name]
        except KeyError:
            raise ConvertError(
                f"{self.source}: tensor {name!r} is missing from the checkpoint"
            ) from None

    def file_of(self, name: str) -> Path:
        return self.dir / self.weight_map[name]

    def get(self, name: str) -> torch.Tensor:
        self.info(name)  # the error for a missing name
        return self.files[self.weight_map[name]].read(name)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of tensors, each group's data at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own). Order is kept, so a stream can be written as it comes."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def _header_bytes(specs: list[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": DTYPE_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class StreamingSafetensorsWriter:
    """Writes `specs` (in that order) into `out_dir` as model-0000i-of-0000N.safetensors plus
    model.safetensors.index.json; at most one tensor is held, by the caller."""

    # Room left in each shard for its header, so the whole file stays within the limit.
    HEADER_RESERVE = 2**20

    def __init__(
        self,
        out_dir: str | Path,
        specs: list[TensorSpec],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        fsync: bool = True,
    ) -> None:
        if max_shard_bytes <= self.HEADER_RESERVE:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must exceed {self.HEADER_RESERVE}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"tensor names repeat: {dup[:5]}")
        self.dir = Path(out_dir)
        self.fsync = fsync
        self.shards = plan_shards(specs, max_shard_bytes - self.HEADER_RESERVE)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._file = None
        self.total_bytes = sum(s.nbytes for s in specs)

    def _next_spec(self, name: str) -> tuple[int, TensorSpec]:
        if self._next >= len(self._queue):
            raise ValueError(
                f"unexpected tensor {name!r}: all {len(self._queue)} planned tensors were written"
            )
        shard, spec = self._queue[self._next]
        if name != spec.name:
            raise ValueError(
                f"tensor {name!r} arrived where {spec.name!r} was planned (position {self._next})"
            )
        if self._file is None:
            self._file = open(self.dir / self.files[shard], "wb", buffering=0)  # noqa: SIM115
            self._file.write(_header_bytes(self.shards[shard]))
        return shard, spec

    def _done(self, shard: int) -> None:
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            self._close_file()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, spec = self._next_spec(name)
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name!r}: {tensor.dtype} {tuple(tensor.shape)} but {spec.dtype} {spec.shape} was planned"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            self._file.write(byte_view(data))
        self._done(shard)

    def copy(self, name: str, ranges: list[tuple[str | None, int, int]], copier: FileCopier) -> None:
        """Tensor `name`'s bytes copied from `ranges` (path or None for zeros, offset, length)."""
        shard, spec = self._next_spec(name)
        got = sum(n for _, _, n in ranges)
        if got != spec.nbytes:
            raise ValueError(f"tensor {name!r}: {got} bytes to copy but {spec.dtype} {spec.shape} was planned")
        copier.copy(ranges, self._file.fileno())
        self._done(shard)

    def _close_file(self) -> None:
        if self._file is not None:
            if self.fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Check every planned tensor arrived and write the index."""
        self._close_file()
        if self._next != len(self._queue):
            missing = [s.name for _, s in self._queue[self._next :]]
            raise ValueError(
                f"{len(missing)} planned tensors were never written, first {missing[0]!r}"
            )
        weight_map = {s.name: self.files[i] for i, shard in enumerate(self.shards) for s in shard}
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
