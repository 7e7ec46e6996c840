"""The torch_dist format (Megatron-Core dist_checkpointing) written and read without ever
holding a whole model.

Writing: `save_sharded_lazily` takes the `sharded_state_dict` of a model built on the meta
device (keys, global shapes, offsets, replica ids, the SwiGLU factory: all Megatron's own) and
saves it through torch.distributed.checkpoint with a planner whose `resolve_data` asks a
callback for each parameter's data only when the writer reaches it. The files are exactly what
`dist_checkpointing.save` writes (metadata.json, .metadata, __<rank>_0.distcp; the common,
non-sharded state is the object "common_state" inside them), so `dist_checkpointing.load`
reads and reshards them.

Reading: `DistCheckpointReader.read(key, offset, shape)` loads the stored chunks that overlap a
region straight from the .distcp files (the .metadata index gives file, offset and length of
each torch.save'd chunk); `tp1_param_locations` says which regions make up each parameter of a
TP = PP = 1 model, so a parameter is one read (two for SwiGLU's fc1, merged as Megatron does).

Running: `launch` runs a conversion function on the ranks it needs (in this process for one
rank, gloo ranks via `run_distributed` otherwise); ranks compare their input checks with
`agree_on_errors` before writing, so a bad input fails the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

from megatron_revisual.convert.hf_load import global_param_names
from megatron_revisual.convert.prefetch import PEAK_FACTOR, Prefetcher
from megatron_revisual.convert.safetensors_io import ConvertError

log = logging.getLogger(__name__)

# A conversion of a 32B model on slow disks takes a while; a stuck rank still ends eventually.
CONVERT_TIMEOUT_S = 6 * 3600.0


@dataclasses.dataclass(frozen=True)
class _Source:
    param: str  # state-dict name of the parameter this chunk comes from
    factory: Any  # the ShardedTensorFactory that splits it (SwiGLU fc1), or None
    index: int  # which of the factory's tensors


def save_sharded_lazily(
    sharded_state_dict: dict,
    ckpt_dir: str,
    materialize: Callable[[str], torch.Tensor],
    param_nbytes: dict[str, int],
) -> int:
    """dist_checkpointing's torch_dist save of a (meta-device) model's `sharded_state_dict`,
    where each parameter's data is `materialize(name)` (`param_nbytes`: the parameters and the
    bytes each materialises to), computed on a background thread shortly before the writer
    reaches it and dropped once its chunks are written. Collective over the world. Returns
    bytes written here."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
        is_main_replica,
    )
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    sources: dict[tuple[str, tuple[int, ...]], _Source] = {}
    uses: dict[str, int] = {}
    for name, value in list(sharded_state_dict.items()):
        if isinstance(value, ShardedTensor | ShardedTensorFactory) and name not in param_nbytes:
            raise ConvertError(
                f"{name}: in the model's sharded_state_dict but not a parameter; cannot fill it from HF"
            )
        if isinstance(value, ShardedTensor):
            built, factory = [value], None
        elif isinstance(value, ShardedTensorFactory):
            factory = value
            sharded_state_dict[name] = value.build()
            built = list(nested_values(sharded_state_dict[name]))
        else:
            continue
        for i, sh in enumerate(built):
            sources[(sh.key, tuple(sh.global_offset))] = _Source(name, factory, i)
            if is_main_replica(sh.replica_id):
                uses[name] = uses.get(name, 0) + 1

    sharded_part, common = save_preprocess(sharded_state_dict, validate_access_integrity=True)
    # As dist_checkpointing.save stores it: one object, written by rank 0 (the main replica).
    sharded_part["common_state"] = ShardedObject(
        "common_state", common, (1,), (0,), replica_id=dist.get_rank()
    )
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
        sharded_part, keep_only_main_replica=True
    )
    planner = _LazySavePlanner(sources, uses, materialize, param_nbytes)
    # One thread, no copy-ahead: the serial loader, which resolves a tensor only after writing
    # the previous one (what `release_previous` relies on).
    writer = FileSystemWriter(
        ckpt_dir,
        single_file_per_rank=True,
        sync_files=True,
        thread_count=1,
        per_thread_copy_ahead=0,
    )
    crc = torch.serialization.get_crc32_options()
    # The zip CRC of each record costs more than the write itself; torch.load does not check it.
    torch.serialization.set_crc32_options(False)
    try:
        dcp_save(
            mcore_to_pyt_state_dict(flat, is_loading=False), storage_writer=writer, planner=planner
        )
    finally:
        torch.serialization.set_crc32_options(crc)
        planner.close()
    if dist.get_rank() == 0:
        save_config(CheckpointingConfig("torch_dist", 1), ckpt_dir)
    dist.barrier()
    return planner.bytes_written


class _LazySavePlanner(MCoreSavePlanner):
    """Megatron's save planner, but tensors come from `materialize` when the writer resolves
    them; a parameter split into several chunks (SwiGLU fc1) is computed once and kept only
    until its last chunk is written.

    torch's FileSystemWriter keeps a reference to every tensor it wrote (its `tensor_dict`, per
    key) until the file is closed, which would hold the embedding, the output layer and a layer's
    worth of weights. So once the (serial) writer asks for the next tensor, the previous one's
    storage is released here, under the writer's reference.

    The serial writer resolves the items in the order of the final plan, so `finish_plan` knows
    which parameters come next: a `Prefetcher` materialises them while the writer writes (its
    budget: the largest parameter). Should the writer ever ask out of that order, the parameter
    is materialised on the spot and prefetching stops."""

    def __init__(
        self,
        sources: dict,
        uses: dict[str, int],
        materialize: Callable[[str], torch.Tensor],
        param_nbytes: dict[str, int],
    ) -> None:
        super().__init__(dedup_replicated_tensors=None, flatten_state_dict=False)
        self.sources, self.uses, self.materialize = sources, dict(uses), materialize
        self.param_nbytes = param_nbytes
        self.cache: dict[str, torch.Tensor] = {}
        self.previous: torch.Tensor | None = None
        self.bytes_written = 0
        self.ahead: Prefetcher | None = None

    def finish_plan(self, new_plan):  # noqa: ANN001, ANN201 (torch's signature)
        from torch.distributed.checkpoint.planner import WriteItemType

        plan = super().finish_plan(new_plan)
        order: dict[str, None] = {}  # parameters in the order of their first write item
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                continue
            src = self.sources.get((item.index.fqn, tuple(item.index.offset)))
            if src is not None:
                order.setdefault(src.param)
        if order:
            self.ahead = Prefetcher(
                order,
                produce=self.materialize,
                nbytes=lambda param: PEAK_FACTOR * self.param_nbytes[param],
                budget_bytes=max(self.param_nbytes[p] for p in order),
                name="hf-to-mcore-read",
            )
        return plan

    def _take(self, param: str) -> torch.Tensor:
        if self.ahead is not None:
            if self.ahead.peek_next() == param:
                return self.ahead.get(param)
            log.warning(
                "hf-to-mcore: the writer asked for %s, not the planned %s; reading on demand from here",
                param,
                self.ahead.peek_next(),
            )
            self.ahead.close()  # not the predicted order: no more guessing
            self.ahead = None
        return self.materialize(param)

    def close(self) -> None:
        self.release_previous()
        if self.ahead is not None:
            self.ahead.close()
            self.ahead = None

    def release_previous(self) -> None:
        if self.previous is not None:
            storage = self.previous.untyped_storage()
            if storage.resizable():
                storage.resize_(0)
            self.previous = None

    def resolve_data(self, write_item):  # noqa: ANN001, ANN201 (torch's signature)
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from torch.distributed.checkpoint.planner import WriteItemType

        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        self.release_previous()  # the serial writer has finished writing it
        src = self.sources[(write_item.index.fqn, tuple(write_item.index.offset))]
        param = self.cache.pop(src.param, None)
        if param is None:
            param = self._take(src.param)
        self.uses[src.param] -= 1
        if self.uses[src.param] > 0:
            self.cache[src.param] = param
        data = param
        if src.factory is not None:
            data = list(nested_values(dataclasses.replace(src.factory, data=param).build()))[
                src.index
            ].data
        data = data.reshape(write_item.tensor_data.chunk.sizes)
        if data.untyped_storage().nbytes() != data.nbytes:
            data = data.clone()  # a view of a parameter still cached: give the writer its own copy
        if src.param not in self.cache:
            self.previous = data
        self.bytes_written += data.nbytes
        return data


class _FileSlice(io.RawIOBase):
    """[start, start + length) of an open file as a seekable stream (for torch.load)."""

    def __init__(self, f, start: int, length: int) -> None:  # noqa: ANN001
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + offset))
        return self.pos

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

    def _load_chunk(self, key: str, chunk) -> torch.Tensor:  # noqa: ANN001
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        if info.transform_descriptors:
            raise ConvertError(
                f"{self.dir}: {key} is stored with transforms {info.transform_descriptors}; not supported"
            )
        path = self.dir / info.relative_path
        with open(path, "rb") as f:
            t = torch.load(
                _FileSlice(f, info.offset, info.length), map_location="cpu", weights_only=True
            )
        if tuple(t.shape) != tuple(chunk.sizes):
            raise ConvertError(
                f"{path}: chunk of {key} at {list(chunk.offsets)} has shape {list(t.shape)}, index says {list(chunk.sizes)}"
            )
        return t

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


@dataclasses.dataclass
class ParamLocation:
    chunks: list  # ShardedTensors (without data) that together make the parameter
    merge: Callable | None  # the factory's merge (torch.cat for SwiGLU fc1), or None
    shape: tuple[int, ...]


def tp1_param_locations(model: torch.nn.Module) -> dict[str, ParamLocation]:
    """Where each parameter (global name) of a TP=PP=1 model lives in a dist checkpoint."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    params = dict(model.named_parameters())
    names = global_param_names(model)
    out = {}
    for name, value in model.sharded_state_dict().items():
        if name not in params:
            continue
        if isinstance(value, ShardedTensor):
            loc = ParamLocation([value.without_data()], None, tuple(params[name].shape))
        elif isinstance(value, ShardedTensorFactory):
            chunks = [sh.without_data() for sh in nested_values(value.build())]
            loc = ParamLocation(chunks, value.merge_fn, tuple(params[name].shape))
        else:
            continue
        out[names[name]] = loc
    return out


def read_param(reader: DistCheckpointReader, loc: ParamLocation) -> torch.Tensor:
    parts = []
    for sh in loc.chunks:
        region = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        parts.append(reader.read(sh.key, tuple(sh.global_offset), region).reshape(sh.local_shape))
    return loc.merge(parts) if loc.merge is not None else parts[0]


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
