"""The TP = PP = 1 checkpoint layout twice, in one form: as `convert.tp1_layout` states it, and
as Megatron-Core's `sharded_state_dict` of the built (meta-device) model says it. Tests hold the
two equal (tests/unit/test_convert_layout.py on tiny models, test_convert_presets.py on the
3B / 7B / 32B presets).

    params, objects = megatron_layout(model)   # in a process with Megatron's parallel state
    assert (params, objects) == stated_layout(model_cfg)

`params`: {global parameter name: (shape, [(key, global shape, offsets, sizes, rows may
differ, first parameter row), ...])}; `objects`: {stored object key: value}.
"""

from __future__ import annotations

import torch

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.convert.tp1_layout import tp1_layout


def megatron_layout(model: torch.nn.Module) -> tuple[dict, dict]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    from megatron_revisual.convert.hf_load import global_param_names

    names = global_param_names(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    params, objects = {}, {"common_state/shard_0_1": {}}  # dist_checkpointing.save adds it
    for name, value in model.sharded_state_dict().items():
        if isinstance(value, ShardedObject):
            objects[value.unique_key] = value.data
            continue
        built = nested_values(value.build()) if isinstance(value, ShardedTensorFactory) else [value]
        chunks = []
        for sh in built:
            if not isinstance(sh, ShardedTensor):
                raise TypeError(f"{name}: {type(sh).__name__} in the sharded_state_dict")
            chunks.append(
                (
                    sh.key,
                    tuple(sh.global_shape),
                    tuple(sh.global_offset),
                    (1,) * sh.prepend_axis_num + tuple(sh.local_shape),
                    sh.allow_shape_mismatch,
                    sh.global_offset[sh.prepend_axis_num],  # at TP = 1: the parameter's row
                )
            )
        params[names[name]] = (shapes[name], chunks)
    return params, objects


def stated_layout(model_cfg: ModelConfig) -> tuple[dict, dict]:
    params, objects = tp1_layout(model_cfg)
    stated = {
        p.name: (
            p.shape,
            [
                (p.key, p.global_shape, c.offsets, c.sizes, p.rows_may_differ, c.rows[0])
                for c in p.chunks
            ],
        )
        for p in params
    }
    return stated, {o.key: o.value for o in objects}
