"""hf-to-mcore at TP = PP = 1 and mcore-to-hf, in this process, without megatron.core.

Both directions take the checkpoint's layout from `tp1_layout` and plan each tensor with
`rows.row_runs` over the mapping (`to_megatron`, `to_hf`), so nearly every byte goes from the
input file to the output file by `copy_file_range`: no tensor in memory, no Megatron import,
no process group. A tensor the plan cannot express as row moves (the vision patch kernel on
export, a row-parallel weight of a checkpoint saved at TP > 1) is read, mapped and written
through memory, one at a time.

    hf_to_mcore_tp1(model_cfg, HFCheckpoint(hf_dir), staging_dir)
    mcore_to_hf_tp1(model_cfg, ckpt_dir, staging_dir, source, max_shard_bytes)
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.convert.dist_io import DistCheckpointReader
from megatron_revisual.convert.distcp_write import TorchDistWriter
from megatron_revisual.convert.export import hf_shapes, rule_to_hf
from megatron_revisual.convert.hf_load import mapping_context
from megatron_revisual.convert.hf_write import write_hf_weights
from megatron_revisual.convert.mapping import MappingContext, Rule, to_hf, to_megatron
from megatron_revisual.convert.rows import RowSource, byte_ranges, row_runs, slice_runs
from megatron_revisual.convert.safetensors_io import ConvertError, HFCheckpoint, TensorSpec
from megatron_revisual.convert.tp1_layout import StoredParam, tp1_layout

_MODEL_PREFIXES = ("language_model.", "vision_model.")


def hf_shape_errors(
    reader: HFCheckpoint,
    wanted: list[tuple[Rule, tuple[int, ...]]],
    ctx: MappingContext,
    model_cfg: ModelConfig,
) -> list[str]:
    """Every HF tensor that `wanted` (rule, parameter shard shape) needs and the checkpoint lacks
    or holds in another shape, named with the file and the config it was expected from."""
    errors = []
    for rule, shape in wanted:
        for name, want in zip(rule.hf, hf_shapes(rule, shape, ctx, model_cfg), strict=True):
            if name not in reader.weight_map:
                errors.append(
                    f"{reader.source}: tensor {name!r} is missing (needed for {rule.megatron})"
                )
                continue
            got = reader.info(name).shape
            if got != want:
                errors.append(
                    f"{reader.file_of(name)}: tensor {name!r} has shape {list(got)}; expected "
                    f"{list(want)} from {reader.dir / 'config.json'}"
                )
    return errors


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def _row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n * dtype.itemsize


# --------------------------------------------------------------------------- hf-to-mcore


def hf_to_mcore_tp1(model_cfg: ModelConfig, reader: HFCheckpoint, ckpt_dir: str | Path) -> int:
    """Write the torch_dist checkpoint a TP = PP = 1 save of this model writes; bytes written."""
    ctx = mapping_context(model_cfg, 1)
    params, objects = tp1_layout(model_cfg)
    errors = hf_shape_errors(reader, [(p.rule, p.shape) for p in params], ctx, model_cfg)
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ConvertError("\n".join(errors[:10]) + more)
    writer = TorchDistWriter(ckpt_dir)
    try:
        for p in params:
            _write_param(writer, p, reader, ctx)
        for obj in objects:
            writer.add_object(obj.key, obj.value)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.bytes_written


def _write_param(
    writer: TorchDistWriter, p: StoredParam, reader: HFCheckpoint, ctx: MappingContext
) -> None:
    infos = [reader.info(n) for n in p.rule.hf]
    dtype = infos[0].dtype
    plans = row_runs(lambda xs: [to_megatron(p.rule, xs, ctx, 0)], [_rows(i.shape) for i in infos])
    sources = [
        RowSource.contiguous(
            str(reader.file_of(i.name)),
            reader.files[reader.weight_map[i.name]].data_start + i.begin,
            _rows(i.shape),
            _row_bytes(i.shape, i.dtype),
        )
        for i in infos
    ]
    full = None
    if plans is None or len({i.dtype for i in infos}) != 1:  # not a row move: through memory
        full = to_megatron(p.rule, [reader.get(n) for n in p.rule.hf], ctx, 0)
    for chunk in p.chunks:
        a, b = chunk.rows
        if full is not None:
            writer.add_chunk(
                p.key,
                p.global_shape,
                chunk.offsets,
                chunk.sizes,
                full.dtype,
                tensor=full[a:b].reshape(chunk.sizes),
            )
        else:
            ranges = byte_ranges(slice_runs(plans[0], a, b), sources)
            writer.add_chunk(
                p.key, p.global_shape, chunk.offsets, chunk.sizes, dtype, ranges=ranges
            )


# --------------------------------------------------------------------------- mcore-to-hf


def checkpoint_errors(
    reader: DistCheckpointReader, params: list[StoredParam], source: str
) -> list[str]:
    """Keys `params` need that the checkpoint lacks or holds in another global shape (the
    vocabulary may have more padding rows), and model tensors it holds that `params` lack."""
    errors = []
    for p in params:
        md = reader.tensors.get(p.key)
        if md is None:
            errors.append(
                f"{reader.dir}: tensor {p.key!r} (for {p.name}) is missing from the checkpoint; {source} needs it"
            )
            continue
        got, want = tuple(md.size), p.global_shape
        rows_ok = p.rows_may_differ and got[1:] == want[1:] and got[0] >= want[0]
        if got != want and not rows_ok:
            errors.append(
                f"{reader.dir}: tensor {p.key!r} has global shape {list(got)}; {source} expects {list(want)}"
            )
    expected = {p.key for p in params}
    unexpected = sorted(
        k for k in reader.tensors if k.startswith(_MODEL_PREFIXES) and k not in expected
    )
    if unexpected:
        errors.append(
            f"{reader.dir}: tensors {unexpected[:3]} have no place in the model of {source}"
        )
    return errors


def mcore_to_hf_tp1(
    model_cfg: ModelConfig,
    ckpt_dir: str | Path,
    out_dir: str | Path,
    source: str,
    max_shard_bytes: int,
) -> list[str]:
    """Write the checkpoint's weights (saved at any layout) as safetensors shards; the files."""
    reader = DistCheckpointReader(ckpt_dir)
    params, _ = tp1_layout(model_cfg)
    errors = checkpoint_errors(reader, params, source)
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ConvertError("\n".join(errors[:10]) + more)
    ctx = mapping_context(model_cfg, 1)
    specs: list[TensorSpec] = []
    for p in params:
        dtype = reader.tensors[p.key].properties.dtype
        shapes = hf_shapes(p.rule, p.shape, ctx, model_cfg)
        specs += [TensorSpec(n, s, dtype) for n, s in zip(p.rule.hf, shapes, strict=True)]

    def stream():
        for p in params:
            offsets, sizes = p.region
            dtype = reader.tensors[p.key].properties.dtype
            src = reader.row_source(p.key, offsets, sizes, p.row_axis)
            plans = row_runs(lambda xs, p=p: to_hf(p.rule, xs, ctx), [_rows(p.shape)])
            if src is not None and plans is not None:
                for name, runs in zip(p.rule.hf, plans, strict=True):
                    yield name, byte_ranges(runs, [src])
                continue
            param = reader.read(p.key, offsets, sizes).reshape(p.shape).to(dtype)
            yield from zip(p.rule.hf, rule_to_hf(p.rule, [param], ctx, model_cfg), strict=True)

    return write_hf_weights(Path(out_dir), specs, stream(), max_shard_bytes=max_shard_bytes)
