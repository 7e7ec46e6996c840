"""The 3B / 7B / 32B presets on the meta device, through the converter's own paths.

Export: our model (TP = PP = 1, meta) streamed by `stream_hf_tensors` gives every tensor of
transformers' model (built on meta from `hf_config_dict`, saved-checkpoint names) exactly once,
with its shape. Import: every Megatron parameter has exactly one rule, `to_megatron` of the HF
shapes gives the parameter's shape, and the TP=2 shards map back to the HF shapes. The TP = PP = 1
checkpoint layout that the one-process converter states (`convert.tp1_layout`: keys, chunks,
objects) is the one the model's sharded_state_dict gives.
Parameter counts are tests/unit/test_presets_meta.py's business.
"""

from __future__ import annotations

import pytest
import torch

from megatron_revisual.parallel import run_distributed
from megatron_revisual.testing.sharded_layout import stated_layout

PRESET_NAMES = ["qwen25_vl_3b", "qwen25_vl_7b", "qwen25_vl_32b"]


def _export_side(names: list[str]) -> dict:
    from megatron_revisual.convert.dist_ckpt import build_meta_stage, run_config_for
    from megatron_revisual.convert.export import local_params_by_global_name, stream_hf_tensors
    from megatron_revisual.models.qwen25_vl.presets import PRESETS
    from megatron_revisual.testing.sharded_layout import megatron_layout

    out = {}
    for name in names:
        model_cfg = PRESETS[name]()
        model = build_meta_stage(run_config_for(model_cfg, 1, 1))
        exported = [(n, tuple(t.shape)) for n, t in stream_hf_tensors(model, model_cfg)]
        params = {n: tuple(p.shape) for n, p in local_params_by_global_name(model).items()}
        out[name] = {
            "exported": exported,
            "params": params,
            "layout": megatron_layout(model),
        }
    return out


@pytest.fixture(scope="module")
def export_side():
    return run_distributed(_export_side, world_size=1, args=(PRESET_NAMES,), timeout_s=600)[0]


def _hf_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    from transformers import Qwen2_5_VLConfig

    from megatron_revisual.models.qwen25_vl.presets import hf_config_dict
    from megatron_revisual.testing.tiny_checkpoint import checkpoint_tensor_shapes

    return checkpoint_tensor_shapes(Qwen2_5_VLConfig(**hf_config_dict(model_cfg)))


@pytest.mark.integration
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_preset_mapping_coverage(export_side, preset):
    from megatron_revisual.convert.export import export_rules
    from megatron_revisual.convert.hf_load import mapping_context
    from megatron_revisual.convert.mapping import to_hf, to_megatron
    from megatron_revisual.models.qwen25_vl.presets import PRESETS

    model_cfg = PRESETS[preset]()
    hf = _hf_shapes(model_cfg)
    side = export_side[preset]

    # Export: each HF tensor exactly once, with HF's shape.
    names = [n for n, _ in side["exported"]]
    assert len(names) == len(set(names))
    assert set(names) == set(hf)
    assert {n: s for n, s in side["exported"]} == hf
    assert ("lm_head.weight" in hf) == (not model_cfg.tie_word_embeddings)

    # Import: every parameter covered by exactly one rule, mapped shapes equal parameter shapes.
    rules = export_rules(model_cfg)
    assert sorted(r.megatron for r in rules) == sorted(side["params"])
    assert sorted(n for r in rules for n in r.hf) == sorted(hf)
    ctx1, ctx2 = mapping_context(model_cfg, 1), mapping_context(model_cfg, 2)
    for rule in rules:
        inputs = [torch.empty(hf[n], device="meta") for n in rule.hf]
        assert tuple(to_megatron(rule, inputs, ctx1, 0).shape) == side["params"][rule.megatron], (
            rule.megatron
        )
        if rule.kind.value != "patch" and model_cfg.num_query_groups % 2 == 0:
            shards = [to_megatron(rule, inputs, ctx2, r) for r in range(2)]
            assert [tuple(t.shape) for t in to_hf(rule, shards, ctx2)] == [
                hf[n] for n in rule.hf
            ], rule.megatron

    # The layout both one-process directions use is Megatron's, on this preset's shapes.
    assert stated_layout(model_cfg) == side["layout"]
    assert set(side["layout"][0]) == {r.megatron for r in rules}

    # Sizes this test is about (the released checkpoints').
    expected = {
        "qwen25_vl_3b": (36, 151936, True),
        "qwen25_vl_7b": (28, 152064, False),
        "qwen25_vl_32b": (64, 152064, False),
    }[preset]
    assert (model_cfg.num_layers, model_cfg.vocab_size, model_cfg.tie_word_embeddings) == expected
    assert (
        sum(1 for n in hf if n.startswith("visual.blocks.") and n.endswith("attn.qkv.weight")) == 32
    )
