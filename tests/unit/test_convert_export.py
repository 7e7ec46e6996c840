"""The export path on one rank: `stream_hf_tensors` over a model laid out with our parameter
names, the TP=1 views of `rule_to_hf`, bucketing, and the config.json checks of hf_write."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_revisual.config.schema import ModelConfig, VisionConfig
from megatron_revisual.convert.export import (
    _buckets,
    _Item,
    export_rules,
    hf_shapes,
    model_layer_backend,
    rule_to_hf,
    stream_hf_tensors,
)
from megatron_revisual.convert.hf_load import mapping_context
from megatron_revisual.convert.hf_write import config_mismatches, write_hf_side_files
from megatron_revisual.convert.mapping import Kind, Rule, to_hf, to_megatron

TEXT = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=96,
    vocab_size=100,
    params_dtype="fp32",
)
VL = dataclasses.replace(
    TEXT,
    vocab_size=128,
    vision=VisionConfig(
        depth=1, hidden_size=32, num_heads=2, intermediate_size=48, fullatt_block_indexes=[0]
    ),
)


def _hf_shape_table(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF shapes written out by hand (what transformers' Qwen2 / Qwen2.5-VL save)."""
    h, f, v, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim
    kv = cfg.num_query_groups * hd
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        out.update(
            {
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.post_attention_layernorm.weight": (h,),
                f"{p}.self_attn.q_proj.weight": (h, h),
                f"{p}.self_attn.q_proj.bias": (h,),
                f"{p}.self_attn.k_proj.weight": (kv, h),
                f"{p}.self_attn.k_proj.bias": (kv,),
                f"{p}.self_attn.v_proj.weight": (kv, h),
                f"{p}.self_attn.v_proj.bias": (kv,),
                f"{p}.self_attn.o_proj.weight": (h, h),
                f"{p}.mlp.gate_proj.weight": (f, h),
                f"{p}.mlp.up_proj.weight": (f, h),
                f"{p}.mlp.down_proj.weight": (h, f),
            }
        )
    if cfg.vision is not None:
        vh, vf, m = cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.hidden_size * 4
        out["visual.patch_embed.proj.weight"] = (vh, 3, 2, 14, 14)
        b = "visual.blocks.0"
        out.update(
            {
                f"{b}.norm1.weight": (vh,),
                f"{b}.norm2.weight": (vh,),
                f"{b}.attn.qkv.weight": (3 * vh, vh),
                f"{b}.attn.qkv.bias": (3 * vh,),
                f"{b}.attn.proj.weight": (vh, vh),
                f"{b}.attn.proj.bias": (vh,),
                f"{b}.mlp.gate_proj.weight": (vf, vh),
                f"{b}.mlp.gate_proj.bias": (vf,),
                f"{b}.mlp.up_proj.weight": (vf, vh),
                f"{b}.mlp.up_proj.bias": (vf,),
                f"{b}.mlp.down_proj.weight": (vh, vf),
                f"{b}.mlp.down_proj.bias": (vh,),
                "visual.merger.ln_q.weight": (vh,),
                "visual.merger.mlp.0.weight": (m, m),
                "visual.merger.mlp.0.bias": (m,),
                "visual.merger.mlp.2.weight": (h, m),
                "visual.merger.mlp.2.bias": (h,),
            }
        )
    return out


class _Stage(torch.nn.Module):
    """Parameters under our Megatron names, with `layer_number`s like Megatron's layers."""

    def __init__(self, params: dict[str, torch.Tensor], num_layers: int) -> None:
        super().__init__()
        for name, t in params.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if part == "layers":
                    if not hasattr(module, "layers"):
                        module.layers = torch.nn.ModuleList()
                        for i in range(num_layers):
                            layer = torch.nn.Module()
                            layer.layer_number = i + 1
                            module.layers.append(layer)
                    module = module.layers
                elif isinstance(module, torch.nn.ModuleList):
                    module = module[int(part)]
                else:
                    if not hasattr(module, part):
                        setattr(module, part, torch.nn.Module())
                    module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))


@pytest.mark.parametrize("cfg", [TEXT, VL], ids=["qwen2", "qwen25_vl"])
def test_stream_hf_tensors_single_rank_is_bitwise_and_complete(cfg):
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for n, s in _hf_shape_table(cfg).items()}
    ctx = mapping_context(cfg, 1)
    # Megatron's (vision-first-stage) parameters, mapped from the HF tensors.
    params = {r.megatron: to_megatron(r, [hf[n] for n in r.hf], ctx, 0) for r in export_rules(cfg)}
    model = _Stage(params, cfg.num_layers)
    out = list(stream_hf_tensors(model, cfg, bucket_bytes=1))
    assert [n for n, _ in out] == [n for r in export_rules(cfg) for n in r.hf]
    assert sorted(n for n, _ in out) == sorted(hf)
    for name, t in out:
        assert t.shape == hf[name].shape and torch.equal(t, hf[name]), name


def test_stream_refuses_parameters_without_a_rule():
    params = {r.megatron: torch.zeros(1) for r in export_rules(TEXT)}
    params["language_model.decoder.layers.0.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="parameters without a rule in convert.mapping"):
        list(stream_hf_tensors(_Stage(params, TEXT.num_layers), TEXT))


@pytest.mark.parametrize(
    "kind", [Kind.COLUMN, Kind.ROW, Kind.VOCAB, Kind.REPLICATED, Kind.GATE_UP, Kind.QKV]
)
def test_rule_to_hf_matches_to_hf_at_tp1(kind):
    ctx = dataclasses.replace(mapping_context(TEXT, 1), padded_vocab_size=128)
    shapes = {Kind.VOCAB: (128, 8), Kind.QKV: (128, 8), Kind.GATE_UP: (12, 8)}
    t = torch.randn(shapes.get(kind, (6, 8)))
    names = ("q", "k", "v") if kind is Kind.QKV else ("a", "b") if kind is Kind.GATE_UP else ("a",)
    rule = Rule("x", names, kind)
    ours, ref = rule_to_hf(rule, [t], ctx, TEXT), to_hf(rule, [t], ctx)
    assert [x.shape for x in ours] == [x.shape for x in ref]
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    if kind is Kind.VOCAB:
        assert ours[0].shape == (100, 8) and ours[0].data_ptr() == t.data_ptr()  # a view, no copy


def test_hf_shapes_of_the_patch_kernel():
    rule = next(r for r in export_rules(VL) if r.kind is Kind.PATCH)
    assert hf_shapes(rule, (32, 3 * 2 * 14 * 14), mapping_context(VL, 1), VL) == [
        (32, 3, 2, 14, 14)
    ]


def test_buckets_split_on_owner_dtype_and_size():
    def item(owner: int, dtype: torch.dtype, numel: int) -> _Item:
        return _Item(Rule("m", ("h",), Kind.REPLICATED), owner, (numel,), dtype, [(numel,)])

    items = [
        item(0, torch.float32, 10),
        item(0, torch.float32, 10),
        item(0, torch.float32, 10),
        item(1, torch.float32, 5),
        item(1, torch.bfloat16, 5),
        item(1, torch.bfloat16, 100),
    ]
    sizes = [[i.hf_numel for i in b] for b in _buckets(items, bucket_bytes=80)]
    assert sizes == [[10, 10], [10], [5], [5], [100]]


def test_layer_backend_from_parameter_names():
    assert (
        model_layer_backend(["language_model.decoder.layers.0.input_layernorm.weight"]) == "local"
    )
    te = "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    assert model_layer_backend([te]) == "transformer_engine"


def test_config_checks_and_generated_side_files(tmp_path):
    from megatron_revisual.models.qwen25_vl.presets import hf_config_dict

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(hf_config_dict(VL)))
    assert config_mismatches(VL, tmp_path / "src") == []
    assert config_mismatches(dataclasses.replace(VL, num_layers=3), tmp_path / "src") == [
        "num_layers: 2 in config.json, 3 in the checkpoint"
    ]
    out = tmp_path / "out"
    out.mkdir()
    write_hf_side_files(out, VL, None)  # no source: config.json from hf_config_dict
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert json.loads((out / "generation_config.json").read_text()) == {}


def test_copied_config_dtype_follows_the_weights(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    from megatron_revisual.models.qwen25_vl.presets import hf_config_dict

    (src / "config.json").write_text(json.dumps(hf_config_dict(VL)))  # fp32 model
    (src / "tokenizer.json").write_text("{}")
    write_hf_side_files(out, dataclasses.replace(VL, params_dtype="bf16"), src)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_text() == "{}"
    write_hf_side_files(tmp_path, VL, src)  # same dtype: copied byte for byte
    assert (tmp_path / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_stream_leaves_out_excluded_prefixes():
    g = torch.Generator().manual_seed(1)
    hf = {n: torch.randn(s, generator=g) for n, s in _hf_shape_table(VL).items()}
    ctx = mapping_context(VL, 1)
    params = {r.megatron: to_megatron(r, [hf[n] for n in r.hf], ctx, 0) for r in export_rules(VL)}
    model = _Stage(params, VL.num_layers)
    every = [n for n, _ in stream_hf_tensors(model, VL)]
    kept = list(stream_hf_tensors(model, VL, exclude=("visual.",)))
    assert any(n.startswith("visual.") for n in every)
    assert [n for n, _ in kept] == [n for n in every if not n.startswith("visual.")]
    assert all(torch.equal(t, hf[n]) for n, t in kept)
