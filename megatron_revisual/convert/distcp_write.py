"""A torch_dist checkpoint written by one process, tensors' bytes copied file to file.

What `dist_checkpointing.save` of a TP = PP = 1 model writes, from one process without a
process group or megatron.core: `__0_0.distcp` holding one `torch.save` record per stored
chunk and per object, `.metadata` (torch.distributed.checkpoint's `Metadata`: each key's
global shape and chunks, and where each record lies in the file) and `metadata.json`.

A chunk's record is what `torch.save(chunk)` writes, built without the chunk in memory: torch
writes the record around a hole under `torch.serialization.skip_data()`, and the hole, where
`torch.save` would put the tensor's bytes, is filled with `rows.FileCopier` (or from a tensor,
for the few chunks that are not a row move). Records come out byte-identical to `torch.save`'s
without the zip CRC (`torch.serialization.set_crc32_options(False)`).

    w = TorchDistWriter(ckpt_dir)
    w.add_chunk(key, global_shape, offsets, sizes, dtype, ranges=[(path, offset, length), ...])
    w.add_object("common_state/shard_0_1", {})
    w.close()                               # or w.abort() on failure
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_revisual.convert.dist_io import PositionedStream
from megatron_revisual.convert.rows import FileCopier
from megatron_revisual.convert.safetensors_io import byte_view

DATA_FILE = "__0_0.distcp"  # rank 0, the first (only) file of a single-file-per-rank save
METADATA_FILE = ".metadata"
# dist_checkpointing's metadata.json (CheckpointingConfig) for the torch_dist backend
MCORE_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}


class _RecordingStream(PositionedStream):
    """A seekable sink that keeps what is written and where; skipped stretches stay holes."""

    def __init__(self) -> None:
        self.end, self.pieces = 0, []

    def size(self) -> int:
        return self.end

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # noqa: ANN001
        data = bytes(b)
        self.pieces.append((self.pos, data))
        self.pos += len(data)
        self.end = max(self.end, self.pos)
        return len(data)

    def bytes_at(self, start: int, stop: int) -> bytes:
        """What was written in [start, stop), holes as zeros (only small stretches are asked)."""
        out = bytearray(stop - start)
        for pos, data in self.pieces:
            a, b = max(start, pos), min(stop, pos + len(data))
            if a < b:
                out[a - start : b - start] = data[a - pos : b - pos]
        return bytes(out)


class _ReadBack(PositionedStream):
    """A recorded stream read back (for torch.load), without materialising its holes."""

    def __init__(self, rec: _RecordingStream) -> None:
        self.rec = rec

    def size(self) -> int:
        return self.rec.end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001
        n = max(0, min(len(buffer), self.rec.end - self.pos))
        buffer[:n] = self.rec.bytes_at(self.pos, self.pos + n)
        self.pos += n
        return n


@contextlib.contextmanager
def _no_crc32() -> Iterator[None]:
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(crc)


@functools.lru_cache(maxsize=256)
def record_skeleton(sizes: tuple[int, ...], dtype: torch.dtype) -> tuple[bytes, int, bytes]:
    """(bytes before the data, data length, bytes after) of `torch.save` of a contiguous
    tensor of `sizes` and `dtype`, from torch itself (skip_data) and checked by torch.load."""
    nbytes = int(torch.Size(sizes).numel()) * dtype.itemsize
    rec = _RecordingStream()
    # torch.empty reserves address space only; under skip_data torch.save never reads it.
    # No zip CRC: it would be the CRC of the hole, and torch.load does not check it (the
    # multi-rank writer, convert.lazy_save, leaves it out too: it costs more than the write).
    with _no_crc32(), torch.serialization.skip_data():
        torch.save(torch.empty(sizes, dtype=dtype), rec)
    meta = torch.load(_ReadBack(rec), map_location="meta", weights_only=True)
    start = meta.untyped_storage()._checkpoint_offset
    written = sorted((pos, pos + len(d)) for pos, d in rec.pieces if d)
    holes = [(a[1], b[0]) for a, b in zip(written, written[1:], strict=False) if b[0] > a[1]]
    if nbytes and holes != [(start, start + nbytes)]:
        raise RuntimeError(
            f"torch.save({list(sizes)}, {dtype}) under skip_data left holes {holes}; expected the "
            f"data at [{start}, {start + nbytes}): this torch writes records differently"
        )
    return rec.bytes_at(0, start), nbytes, rec.bytes_at(start + nbytes, rec.end)


class TorchDistWriter:
    """Appends records to `<ckpt_dir>/__0_0.distcp`; `close` writes the two metadata files.

    Only `close` needs torch.distributed.checkpoint (its metadata classes, to pickle .metadata),
    and importing it takes ~1 s (DTensor, sympy): a background thread imports it while the
    records are copied, which is kernel time that leaves the interpreter free."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.dir = Path(ckpt_dir)
        self._importer = threading.Thread(
            target=importlib.import_module,
            args=("torch.distributed.checkpoint.filesystem",),
            name="import-dcp",
            daemon=True,
        )
        self._importer.start()
        self._fd = os.open(self.dir / DATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._copier = FileCopier()
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype, list]] = {}
        self.objects: list[str] = []
        # (key, chunk offsets or None for an object) -> (record start, record length)
        self.records: dict[tuple[str, tuple[int, ...] | None], tuple[int, int]] = {}
        self.bytes_written = 0

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def add_chunk(
        self,
        key: str,
        global_shape: tuple[int, ...],
        offsets: tuple[int, ...],
        sizes: tuple[int, ...],
        dtype: torch.dtype,
        *,
        ranges: list[tuple[str | None, int, int]] | None = None,
        tensor: torch.Tensor | None = None,
    ) -> None:
        """One chunk of `key`, its bytes copied from `ranges` (path or None for zeros, offset,
        length) or taken from `tensor`."""
        head, nbytes, tail = record_skeleton(tuple(sizes), dtype)
        start = os.lseek(self._fd, 0, os.SEEK_CUR)
        self._append(head)
        if tensor is not None:
            if tuple(tensor.shape) != tuple(sizes) or tensor.dtype != dtype:
                raise ValueError(
                    f"{key} at {list(offsets)}: got {tensor.dtype} {list(tensor.shape)}, "
                    f"planned {dtype} {list(sizes)}"
                )
            data = tensor.contiguous()
            self._append(byte_view(data) if nbytes else b"")
            copied = nbytes
        else:
            copied = self._copier.copy(ranges or [], self._fd)
        if copied != nbytes:
            raise ValueError(
                f"{key} at {list(offsets)}: {copied} bytes arrived, the record holds {nbytes}"
            )
        self._append(tail)
        entry = self.tensors.setdefault(key, (tuple(global_shape), dtype, []))
        if entry[:2] != (tuple(global_shape), dtype):
            raise ValueError(
                f"{key}: chunks disagree on the global shape / dtype: {entry[:2]} vs "
                f"{(tuple(global_shape), dtype)}"
            )
        entry[2].append((tuple(offsets), tuple(sizes)))
        self._index((key, tuple(offsets)), start)
        self.bytes_written += nbytes

    def add_object(self, key: str, value: Any) -> None:
        """An object as Megatron stores a ShardedObject: `torch.save([value])`."""
        buf = io.BytesIO()
        with _no_crc32():  # as the records of tensors (and the multi-rank writer's objects)
            torch.save([value], buf)
        start = os.lseek(self._fd, 0, os.SEEK_CUR)
        self._append(buf.getvalue())
        self.objects.append(key)
        self._index((key, None), start)

    def _index(self, index: tuple[str, tuple[int, ...] | None], start: int) -> None:
        if index in self.records:
            raise ValueError(f"{index[0]} at {index[1]}: written twice")
        self.records[index] = (start, os.lseek(self._fd, 0, os.SEEK_CUR) - start)

    def close(self) -> None:
        """fsync the data, then write .metadata and metadata.json (each written, synced, renamed)."""
        import pickle

        os.fsync(self._fd)
        os.close(self._fd)
        self._copier.close()
        self._importer.join()
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            StorageMeta,
            TensorProperties,
            TensorStorageMetadata,
        )

        entries: dict[str, Any] = {
            key: TensorStorageMetadata(
                properties=TensorProperties(dtype=dtype),
                size=torch.Size(shape),
                chunks=[ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks],
            )
            for key, (shape, dtype, chunks) in self.tensors.items()
        }
        entries.update({key: BytesStorageMetadata() for key in self.objects})
        storage = {
            (MetadataIndex(key) if offsets is None else MetadataIndex(key, offsets)): _StorageInfo(
                DATA_FILE, start, length
            )
            for (key, offsets), (start, length) in self.records.items()
        }
        metadata = Metadata(
            state_dict_metadata=entries,
            storage_data=storage,
            storage_meta=StorageMeta(checkpoint_id=self.dir, save_id=str(uuid.uuid4())),
            version=CURRENT_DCP_VERSION,
        )
        _write_synced(self.dir / METADATA_FILE, pickle.dumps(metadata))
        _write_synced(self.dir / "metadata.json", json.dumps(MCORE_CONFIG).encode())

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._copier.close()


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
