"""hf-to-mcore on several ranks (--tp / --pp > 1): Megatron's own save, with lazy tensors.

`save_sharded_lazily` takes the `sharded_state_dict` of a model built on the meta device (keys,
global shapes, offsets, replica ids, the SwiGLU factory: all Megatron's own) and saves it
through torch.distributed.checkpoint with a planner whose `resolve_data` asks a callback for
each parameter's data only when the writer reaches it. The files are exactly what
`dist_checkpointing.save` writes (metadata.json, .metadata, __<rank>_0.distcp; the common,
non-sharded state is the object "common_state" inside them), so `dist_checkpointing.load`
reads and reshards them. (One rank, TP = PP = 1, goes through `convert.direct` instead,
without importing megatron.core.)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

from megatron_revisual.convert.prefetch import PEAK_FACTOR, Prefetcher
from megatron_revisual.convert.safetensors_io import ConvertError

log = logging.getLogger(__name__)


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
