"""`tp1_layout` (the TP = PP = 1 checkpoint stated from the rule table, no Megatron import) equals
what megatron-core's `sharded_state_dict` of the model built on the meta device says: keys,
global shapes, chunk offsets and sizes, which parameter rows each chunk holds, the vocabulary
rows that may differ, every `_extra_state` object and its value; and `row_runs` plans the
mapping's row moves exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_revisual.config.schema import ModelConfig, VisionConfig
from megatron_revisual.convert.hf_load import mapping_context
from megatron_revisual.convert.mapping import Kind, Rule, to_hf, to_megatron
from megatron_revisual.convert.rows import ZERO, RowRun, row_runs
from megatron_revisual.convert.tp1_layout import tp1_layout
from megatron_revisual.testing.sharded_layout import stated_layout

TEXT = ModelConfig(
    num_layers=3,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=96,
    vocab_size=100,  # padded to 128: the embedding gains zero rows
    params_dtype="fp32",
    tie_word_embeddings=True,
    mrope_section=[2, 3, 3],  # head_dim 16
)
VL = dataclasses.replace(
    TEXT,
    tie_word_embeddings=False,
    vision=VisionConfig(
        depth=2, hidden_size=32, num_heads=2, intermediate_size=48, fullatt_block_indexes=[1]
    ),
)


def _megatron_layout(model_cfg: ModelConfig) -> tuple[dict, dict]:
    from megatron_revisual.convert.dist_ckpt import build_meta_stage, run_config_for
    from megatron_revisual.testing.sharded_layout import megatron_layout

    return megatron_layout(build_meta_stage(run_config_for(model_cfg, 1, 1)))


@pytest.mark.parametrize("model_cfg", [TEXT, VL], ids=["text_tied", "vl_untied"])
def test_tp1_layout_is_megatrons(model_cfg):
    from megatron_revisual.convert.dist_io import launch

    want_params, want_objects = launch(_megatron_layout, tp=1, pp=1, args=(model_cfg,))[0]
    params, objects = stated_layout(model_cfg)
    assert params == want_params
    assert objects == want_objects
    assert (
        len(objects)
        == 4 * model_cfg.num_layers
        + (4 * model_cfg.vision.depth + 2 if model_cfg.vision else 0)
        + 1
    )
    # a chunk's rows are the parameter's rows it holds, matching its offset
    for p in tp1_layout(model_cfg)[0]:
        assert [c.rows[1] - c.rows[0] for c in p.chunks] == [
            c.sizes[-len(p.shape)] for c in p.chunks
        ]


def _check_plan(mapping, inputs: list[torch.Tensor]) -> list[list[RowRun]]:
    plans = row_runs(mapping, [t.shape[0] for t in inputs])
    assert plans is not None
    for plan, want in zip(plans, mapping(inputs), strict=True):
        rows = [
            torch.zeros(r.count, *want.shape[1:])
            if r.source == ZERO
            else inputs[r.source][r.start : r.start + r.count]
            for r in plan
        ]
        assert torch.equal(torch.cat(rows).reshape(want.shape), want)
    return plans


def test_row_runs_reproduce_the_mapping_and_refuse_column_splits():
    ctx = mapping_context(VL, 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 64, generator=g) for n in (64, 32, 32))
    qkv = Rule("l.qkv", ("q", "k", "v"), Kind.QKV)
    plan = _check_plan(lambda xs: [to_megatron(qkv, xs, ctx, 0)], [q, k, v])[0]
    # 2 groups x [2 q heads, k, v] of head_dim 16: six runs
    assert [(r.source, r.start, r.count) for r in plan] == [
        (0, 0, 32),
        (1, 0, 16),
        (2, 0, 16),
        (0, 32, 32),
        (1, 16, 16),
        (2, 16, 16),
    ]
    _check_plan(lambda xs: to_hf(qkv, xs, ctx), [to_megatron(qkv, [q, k, v], ctx, 0)])
    vocab = Rule("emb", ("e",), Kind.VOCAB)
    plan = _check_plan(lambda xs: [to_megatron(vocab, xs, ctx, 0)], [torch.randn(100, 8)])[0]
    assert [(r.source, r.count) for r in plan] == [(0, 100), (ZERO, 28)]
    gate_up = Rule("fc1", ("g", "u"), Kind.GATE_UP)
    _check_plan(lambda xs: to_hf(gate_up, xs, ctx), [torch.randn(192, 64)])
    # a row-parallel split at TP 2 takes columns: not a row move
    row = Rule("proj", ("o",), Kind.ROW)
    assert row_runs(lambda xs: [to_megatron(row, xs, mapping_context(VL, 2), 0)], [64]) is None
