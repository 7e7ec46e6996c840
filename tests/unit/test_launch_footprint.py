"""Config-only sizes (`launch.footprint`): parameter counts against generated checkpoints, the
released 7B's published size, and the rollout engines' numbers for the 7B recipe by hand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_revisual.config import load_config
from megatron_revisual.convert.hf_load import SafetensorsReader
from megatron_revisual.launch.footprint import (
    GIB,
    kv_cache_bytes_per_token,
    parameter_count,
    rollout_footprint,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text_only,tied", [(False, False), (True, True)], ids=["qwen25_vl", "qwen2_tied"])
def test_parameter_count_is_the_checkpoints(tmp_path, text_only, tied):
    from megatron_revisual.testing.tiny_checkpoint import DEFAULT_SPEC, make_tiny_checkpoint

    spec = dataclasses.replace(DEFAULT_SPEC, tie_word_embeddings=tied)
    hf = make_tiny_checkpoint(tmp_path / "hf", text_only=text_only, seed=0, spec=spec)
    cfg = load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [f"model.hf_path={hf}", "prepare.tiny_model=false"])
    reader = SafetensorsReader(hf)
    numel = {n: reader.get(n).numel() for n in reader.names()}
    counts = parameter_count(cfg.model)
    assert counts["vision"] == sum(v for n, v in numel.items() if n.startswith(("visual.", "model.visual.")))
    assert counts["language"] + counts["vision"] == sum(numel.values())
    assert (counts["vision"] == 0) == text_only


def test_the_7b_recipe_by_hand():
    cfg = load_config(ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml")
    counts = parameter_count(cfg.model)
    # the language model is Qwen2.5-7B's (7,615,616,512: "7.61B" on its model card); with the
    # vision tower, Qwen2.5-VL-7B's card says 8.29B
    assert counts["language"] == 7_615_616_512
    assert round((counts["language"] + counts["vision"]) / 1e7) == 829
    # 28 layers x 4 KV heads x 128 x (K, V) x 2 bytes
    assert kv_cache_bytes_per_token(cfg.model) == 28 * 4 * 128 * 2 * 2 == 57_344
    fp = rollout_footprint(cfg, "mrl")
    assert (fp.engines, fp.engine_tp, fp.train_tp) == (4, 2, 4)
    full = (7_615_616_512 + counts["vision"]) * 2
    assert fp.weight_gib_per_gpu == pytest.approx(full / 2 / GIB)
    assert fp.kv_cache_gib_per_gpu == pytest.approx(0.55 * 79.2 - full / 2 / GIB)
    assert fp.kv_cache_tokens_per_engine == int((0.55 * 79.2 * GIB - full / 2) * 2 // 57_344)
    assert fp.handed_gib_per_gpu == pytest.approx(full / GIB)
    assert fp.gathered_gib_per_gpu == pytest.approx(0.75 * full / GIB)
