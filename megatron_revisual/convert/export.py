"""Megatron -> Hugging Face tensors: the one export path, for the converter and for weight sync.

    for name, tensor in stream_hf_tensors(model, cfg.model):   # on EVERY rank (collective)
        consume(name, tensor)

`stream_hf_tensors` walks `convert.mapping`'s rules in order. For each rule the pipeline stage
holding the parameter all-gathers it over its tensor-parallel group and turns the shards into
the HF tensor(s) with `to_hf` (vocabulary padding truncated); the stage then broadcasts the
result over the pipeline group, so every rank of the world yields every HF tensor, each name
exactly once, in the same order. (Data-parallel replicas need no traffic: each already holds
its own copy.) Broadcasts go in flat buffers of up to `bucket_bytes`, several small tensors per
collective; a tensor larger than that goes alone. With TP = PP = 1 there are no collectives at
all, which also lets the generator run on a meta-device model (shapes only).

With ``own_tp_slot=True`` (a weight sync into a vLLM engine whose TP size and ranks are the
trainer's) the language model's decoder layers are not gathered: each rank's own shard fills
its slot of the HF tensor and the other ranks' slots hold NaN. vLLM's loaders read
only the slot of the engine's TP rank, so the engine gets exactly the shard it would have cut
from the gathered tensor, and the row- and column-parallel layers cost no TP traffic. (The
vocabulary is padded differently by Megatron and vLLM, and the vision tower may run
data-parallel inside vLLM, so embeddings, output layer and vision tower are still gathered.)

Yielded tensors may alias model parameters (never modify them); every bucket gets a fresh
buffer, so a consumer may hold tensors across yields (vLLM's loader holds a layer's worth).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.convert.hf_load import (
    global_param_names,
    mapping_context,
    model_layer_backend,
)
from megatron_revisual.convert.hf_load import model_rule_list as export_rules
from megatron_revisual.convert.mapping import (
    Kind,
    MappingContext,
    Rule,
    to_hf,
    to_hf_patch,
)
from megatron_revisual.parallel.chunks import inner_model, model_chunks
from megatron_revisual.rollout.types import DEFAULT_BUCKET_BYTES

TIED_OUTPUT = "language_model.output_layer.weight"
EMBEDDING = "language_model.embedding.word_embeddings.weight"


def rule_to_hf(
    rule: Rule, shards: list[torch.Tensor], ctx: MappingContext, model_cfg: ModelConfig
) -> list[torch.Tensor]:
    """`to_hf`, plus the vision patch kernel's 5-D HF shape (which needs the vision config)."""
    if rule.kind is Kind.PATCH:
        v = model_cfg.vision
        return [to_hf_patch(shards[0], v.in_channels, v.temporal_patch_size, v.patch_size)]
    return to_hf(rule, shards, ctx)


def hf_shapes(
    rule: Rule, shard_shape: tuple[int, ...], ctx: MappingContext, model_cfg: ModelConfig
) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of `rule`, from one TP shard's shape: `to_hf` run on stand-ins
    with one column per shard (a row-parallel weight's shards join along dim 1), the rest of
    the shape carried over. Not on meta tensors: the first op on one imports torch._dynamo,
    seconds of a conversion that takes a few (and more at its exit)."""
    if rule.kind is Kind.PATCH:
        v = model_cfg.vision
        return [(shard_shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)]
    standins = [torch.zeros(shard_shape[0], 1, dtype=torch.bool) for _ in range(ctx.tp_size)]
    shapes = []
    for t in to_hf(rule, standins, ctx):
        if len(shard_shape) == 1:
            shapes.append((t.shape[0],))
        else:
            shapes.append((t.shape[0], t.shape[1] * shard_shape[1], *shard_shape[2:]))
    return shapes


def is_tied_output_copy(name: str, model_cfg: ModelConfig) -> bool:
    """The last pipeline stage's copy of a tied embedding: exported once, from the first stage."""
    return name == TIED_OUTPUT and model_cfg.tie_word_embeddings


@dataclass(frozen=True)
class _Item:
    rule: Rule
    owner: int  # pipeline stage holding the parameter
    shard_shape: tuple[int, ...]
    dtype: torch.dtype
    hf_shapes: list[tuple[int, ...]]

    @property
    def hf_numel(self) -> int:
        return sum(_numel(s) for s in self.hf_shapes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _parallel_info() -> tuple[int, int, object, int, int, object]:
    from megatron.core import parallel_state as ps

    if not (dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()):
        return 1, 0, None, 1, 0, None
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_group(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_group(),
    )


def local_params_by_global_name(
    model: torch.nn.Module | list[torch.nn.Module],
) -> dict[str, torch.Tensor]:
    """This rank's parameters keyed by global name (layers renumbered across PP / virtual PP)."""
    out: dict[str, torch.Tensor] = {}
    for chunk in model_chunks(model):
        chunk = inner_model(chunk)  # under Megatron's DDP / Float16Module
        params = dict(chunk.named_parameters())
        for local, name in global_param_names(chunk).items():
            out[name] = params[local]
    return out


def _plan(
    local: dict[str, torch.Tensor],
    rules: list[Rule],
    model_cfg: ModelConfig,
    ctx: MappingContext,
    pp: int,
    pp_group,
) -> list[_Item]:
    by_name = {r.megatron: r for r in rules}
    unknown = [n for n in local if n not in by_name and not is_tied_output_copy(n, model_cfg)]
    if unknown:
        raise KeyError(f"parameters without a rule in convert.mapping: {unknown[:5]}")
    mine = {n: (tuple(p.shape), p.dtype) for n, p in local.items() if n in by_name}
    stages = [mine]
    if pp > 1:
        stages = [None] * pp
        dist.all_gather_object(stages, mine, group=pp_group)
    items = []
    for rule in rules:
        owners = [s for s, held in enumerate(stages) if rule.megatron in held]
        if len(owners) != 1:
            where = "no pipeline stage" if not owners else f"stages {owners}"
            raise KeyError(
                f"{rule.megatron} ({', '.join(rule.hf)}) is held by {where}; expected exactly one"
            )
        shape, dtype = stages[owners[0]][rule.megatron]
        items.append(_Item(rule, owners[0], shape, dtype, hf_shapes(rule, shape, ctx, model_cfg)))
    return items


def _buckets(items: list[_Item], bucket_bytes: int) -> Iterator[list[_Item]]:
    """Consecutive items of one owner and dtype, up to bucket_bytes of HF data per bucket."""
    bucket: list[_Item] = []
    size = 0
    for item in items:
        nbytes = item.hf_numel * item.dtype.itemsize
        if bucket and (
            item.owner != bucket[0].owner
            or item.dtype != bucket[0].dtype
            or size + nbytes > bucket_bytes
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += nbytes
    if bucket:
        yield bucket


@dataclass
class ExportTraffic:
    """What one rank's iteration of `stream_hf_tensors` moved between ranks."""

    tp_bytes_sent: int = 0  # all-gathers within the TP group: (tp - 1) x this rank's shard
    pp_bytes_received: int = 0  # broadcasts from the stage holding a bucket
    own_slot_tensors: list[str] = field(default_factory=list)  # Megatron names not gathered


# Layers whose HF tensors are concatenations of the TP shards (in rank order) along one dim.
_SLOT_KINDS = (Kind.COLUMN, Kind.ROW, Kind.QKV, Kind.GATE_UP)
_DECODER = "language_model.decoder."


def _own_slot(rule: Rule) -> bool:
    return rule.kind in _SLOT_KINDS and rule.megatron.startswith(_DECODER)


def _gather_tp(param: torch.Tensor, kind: Kind, tp: int, tp_group, *,
               traffic: ExportTraffic | None) -> list[torch.Tensor]:
    data = param.detach()
    if tp == 1 or kind in (Kind.REPLICATED, Kind.PATCH):
        return [data] * tp
    shards = [torch.empty_like(data) for _ in range(tp)]
    dist.all_gather(shards, data.contiguous(), group=tp_group)
    if traffic is not None:
        traffic.tp_bytes_sent += (tp - 1) * data.numel() * data.element_size()
    return shards


def _own_slot_shards(shard: torch.Tensor, tp: int, tp_rank: int) -> list[torch.Tensor]:
    """All TP ranks' shards as far as this rank knows them: its own, and NaN for the peers'
    (never to be read: a consumer that reads them fails loudly)."""
    other = torch.full_like(shard, float("nan"))
    return [shard if r == tp_rank else other for r in range(tp)]


def stream_hf_tensors(
    model: torch.nn.Module | list[torch.nn.Module],
    model_cfg: ModelConfig,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    exclude: tuple[str, ...] = (),
    own_tp_slot: bool = False,
    traffic: ExportTraffic | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for the whole model from a TP/PP-sharded Megatron model, except
    the tensors whose HF names all start with a prefix in `exclude` (not gathered either).
    `own_tp_slot`: decoder layers carry only this rank's TP slot (see the module docstring);
    `traffic` counts the bytes moved between ranks.

    Collective: every rank of the model-parallel world must iterate it to the end, in step.
    `model` is this rank's model (or its list of virtual-pipeline chunks, or DDP wrappers);
    tensors come on the parameters' device and in their dtype, each HF name exactly once.
    """
    tp, tp_rank, tp_group, pp, pp_rank, pp_group = _parallel_info()
    local = local_params_by_global_name(model)
    rules = export_rules(model_cfg, model_layer_backend(list(local)))
    ctx = mapping_context(model_cfg, tp)
    items = _plan(local, rules, model_cfg, ctx, pp, pp_group)
    if exclude:
        items = [it for it in items if not all(h.startswith(exclude) for h in it.rule.hf)]
    device = next(iter(local.values())).device
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else [0]
    for bucket in _buckets(items, bucket_bytes):
        owner = bucket[0].owner
        # own-slot items travel as the owner's raw shard and become HF tensors on arrival (a PP
        # group joins ranks of one TP rank, so the owner's slot is the receiver's own)
        own = [own_tp_slot and tp > 1 and _own_slot(item.rule) for item in bucket]
        payload: list[torch.Tensor] = []
        if owner == pp_rank:
            for item, mine in zip(bucket, own, strict=True):
                param = local[item.rule.megatron]
                if mine:
                    payload.append(param.detach())
                    if traffic is not None:
                        traffic.own_slot_tensors.append(item.rule.megatron)
                    continue
                shards = _gather_tp(param, item.rule.kind, tp, tp_group, traffic=traffic)
                payload += rule_to_hf(item.rule, shards, ctx, model_cfg)
        if pp > 1:
            shapes = [s for item, mine in zip(bucket, own, strict=True)
                      for s in ([item.shard_shape] if mine else item.hf_shapes)]
            payload = _broadcast_bucket(payload, shapes, bucket[0].dtype, src=pp_ranks[owner],
                                        group=pp_group, device=device)
            if traffic is not None and owner != pp_rank:
                traffic.pp_bytes_received += sum(t.numel() * t.element_size() for t in payload)
        tensors, k = [], 0
        for item, mine in zip(bucket, own, strict=True):
            if mine:
                tensors += rule_to_hf(item.rule, _own_slot_shards(payload[k], tp, tp_rank), ctx, model_cfg)
                k += 1
            else:
                tensors += payload[k : k + len(item.rule.hf)]
                k += len(item.rule.hf)
        names = [n for item in bucket for n in item.rule.hf]
        yield from zip(names, tensors, strict=True)


def _broadcast_bucket(
    tensors: list[torch.Tensor], shapes: list[tuple[int, ...]], dtype: torch.dtype, *, src: int, group,
    device: torch.device,
) -> list[torch.Tensor]:
    if tensors:
        flat = (
            torch.cat([t.reshape(-1) for t in tensors])
            if len(tensors) > 1
            else tensors[0].contiguous().reshape(-1)
        )
    else:
        flat = torch.empty(sum(_numel(s) for s in shapes), dtype=dtype, device=device)
    dist.broadcast(flat, src=src, group=group)
    return [t.view(s) for t, s in zip(flat.split([_numel(s) for s in shapes]), shapes, strict=True)]


def hf_tensor_specs(
    model: torch.nn.Module | list[torch.nn.Module], model_cfg: ModelConfig
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(HF name, shape, dtype) of every tensor `stream_hf_tensors` yields, in its order: what a
    streaming safetensors writer needs up front. Collective over the pipeline group."""
    tp, _, _, pp, _, pp_group = _parallel_info()
    local = local_params_by_global_name(model)
    rules = export_rules(model_cfg, model_layer_backend(list(local)))
    ctx = mapping_context(model_cfg, tp)
    return [
        (name, shape, item.dtype)
        for item in _plan(local, rules, model_cfg, ctx, pp, pp_group)
        for name, shape in zip(item.rule.hf, item.hf_shapes, strict=True)
    ]
