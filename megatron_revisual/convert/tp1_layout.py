"""What a TP = PP = 1 model's torch_dist checkpoint holds, from the rule table alone.

Building the model (even on the meta device) to ask Megatron-Core for its `sharded_state_dict`
means importing megatron.core: ~4 s of a conversion that otherwise takes a few. At TP = PP = 1
the layout is simple enough to state, and `tests/unit/test_convert_layout.py` holds every
statement here equal to what megatron-core 0.19's `sharded_state_dict` of our model says:

- a decoder layer's parameter `<tower>.decoder.layers.<i>.<rest>` is chunk (i, 0, ...) of the
  key `<tower>.decoder.layers.<rest>`, global shape (layers, *shape); the language layers'
  norms are stored under the Transformer Engine names (`te_names`: Megatron's local spec maps
  them so that either spec loads the checkpoint);
- fc1 (GATE_UP) is two chunks of one key: the gate rows, then the up rows (the SwiGLU factory);
- the embedding and output layer may differ in rows on load (the vocabulary padding);
- every linear_qkv / linear_proj / linear_fc1 / linear_fc2 has an `_extra_state` object, None,
  key `<key>._extra_state/shard_<i>_<layers>` (`shard_0_1` outside the decoder layers);
- the common (non-sharded) state is `{}`, stored as the object `common_state/shard_0_1`.

Parameter shapes come from the ModelConfig (`param_shape`), also checked against the model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.convert.hf_load import model_rule_list
from megatron_revisual.convert.mapping import (
    TE_LANGUAGE_LAYER_RENAMES,
    Kind,
    Rule,
    padded_vocab_size,
)

_LAYER = re.compile(r"^(language_model|vision_model)\.decoder\.layers\.(\d+)\.(.+)$")
_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COMMON_STATE_KEY = "common_state/shard_0_1"


@dataclasses.dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]  # in the key's global tensor
    sizes: tuple[int, ...]
    rows: tuple[int, int]  # which rows of the parameter it holds


@dataclasses.dataclass(frozen=True)
class StoredParam:
    name: str  # global Megatron name
    rule: Rule
    key: str
    shape: tuple[int, ...]  # the parameter's (TP = 1)
    global_shape: tuple[int, ...]  # the key's
    layer: int | None  # index along the key's first axis, for decoder layers
    chunks: tuple[Chunk, ...]

    @property
    def rows_may_differ(self) -> bool:
        """Embedding / output layer: a checkpoint saved at another TP pads the vocabulary more."""
        return self.rule.kind is Kind.VOCAB

    @property
    def row_axis(self) -> int:
        return 0 if self.layer is None else 1

    @property
    def region(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, sizes) of the whole parameter in the key's global tensor."""
        lead = () if self.layer is None else (self.layer,)
        ones = () if self.layer is None else (1,)
        return lead + (0,) * len(self.shape), ones + self.shape


@dataclasses.dataclass(frozen=True)
class StoredObject:
    key: str  # with its /shard_<i>_<n> suffix, as stored
    value: Any


def param_shape(name: str, m: ModelConfig) -> tuple[int, ...]:
    """The TP = 1 shape of Megatron parameter `name` (global name, local spec)."""
    h, hd = m.hidden_size, m.head_dim
    match = _LAYER.match(name)
    if match and match.group(1) == "language_model":
        qkv = (m.num_attention_heads + 2 * m.num_query_groups) * hd
        return {
            "input_layernorm.weight": (h,),
            "pre_mlp_layernorm.weight": (h,),
            "self_attention.linear_qkv.weight": (qkv, h),
            "self_attention.linear_qkv.bias": (qkv,),
            "self_attention.linear_proj.weight": (h, m.num_attention_heads * hd),
            "mlp.linear_fc1.weight": (2 * m.ffn_hidden_size, h),
            "mlp.linear_fc2.weight": (h, m.ffn_hidden_size),
        }[match.group(3)]
    if name in (
        "language_model.embedding.word_embeddings.weight",
        "language_model.output_layer.weight",
    ):
        return padded_vocab_size(m.vocab_size, 1), h
    if name == "language_model.decoder.final_layernorm.weight":
        return (h,)
    v = m.vision
    if v is None:
        raise KeyError(f"{name}: a vision parameter, but the model has no vision tower")
    vh, vf = v.hidden_size, v.intermediate_size
    if match:
        return {
            "input_layernorm.weight": (vh,),
            "pre_mlp_layernorm.weight": (vh,),
            "self_attention.linear_qkv.weight": (3 * vh, vh),
            "self_attention.linear_qkv.bias": (3 * vh,),
            "self_attention.linear_proj.weight": (vh, vh),
            "self_attention.linear_proj.bias": (vh,),
            "mlp.linear_fc1.weight": (2 * vf, vh),
            "mlp.linear_fc1.bias": (2 * vf,),
            "mlp.linear_fc2.weight": (vh, vf),
            "mlp.linear_fc2.bias": (vh,),
        }[match.group(3)]
    merged = vh * v.spatial_merge_size**2
    return {
        "vision_model.patch_embed.weight": (
            vh,
            v.in_channels * v.temporal_patch_size * v.patch_size**2,
        ),
        "vision_model.merger.norm.weight": (vh,),
        "vision_model.merger.linear_fc1.weight": (merged, merged),
        "vision_model.merger.linear_fc1.bias": (merged,),
        "vision_model.merger.linear_fc2.weight": (h, merged),
        "vision_model.merger.linear_fc2.bias": (h,),
    }[name]


def _stored_name(name: str) -> tuple[str, int | None]:
    """(key, layer index or None) under which parameter `name` is stored."""
    match = _LAYER.match(name)
    if match is None:
        return name, None
    tower, layer, rest = match.groups()
    if tower == "language_model":
        rest = TE_LANGUAGE_LAYER_RENAMES.get(rest, rest)
    return f"{tower}.decoder.layers.{rest}", int(layer)


def _layers(name: str, m: ModelConfig) -> int:
    if name.startswith("language_model."):
        return m.num_layers
    if m.vision is None:
        raise KeyError(f"{name}: a vision parameter, but the model has no vision tower")
    return m.vision.depth


def tp1_layout(m: ModelConfig) -> tuple[list[StoredParam], list[StoredObject]]:
    """Every parameter and object of the model's TP = PP = 1 checkpoint, in rule order."""
    params, objects = [], []
    for rule in model_rule_list(m):
        shape = param_shape(rule.megatron, m)
        key, layer = _stored_name(rule.megatron)
        lead = () if layer is None else (layer,)
        global_shape = shape if layer is None else (_layers(rule.megatron, m), *shape)
        if rule.kind is Kind.GATE_UP:
            half = shape[0] // 2
            parts = [(0, half), (half, shape[0])]
        else:
            parts = [(0, shape[0])]
        chunks = tuple(
            Chunk(
                offsets=lead + (a,) + (0,) * (len(shape) - 1),
                sizes=(() if layer is None else (1,)) + (b - a, *shape[1:]),
                rows=(a, b),
            )
            for a, b in parts
        )
        params.append(StoredParam(rule.megatron, rule, key, shape, global_shape, layer, chunks))
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in _LINEARS:
            shard = f"{layer}_{_layers(rule.megatron, m)}" if layer is not None else "0_1"
            objects.append(StoredObject(f"{module}._extra_state/shard_{shard}", None))
    objects.append(StoredObject(COMMON_STATE_KEY, {}))
    return params, objects
