"""Our Megatron-Core vision tower equals Hugging Face's, forward and backward, at TP=1 and TP=2.

The tiny random Qwen2.5-VL checkpoint (two vision blocks, block 1 on full attention) is
written once; Hugging Face's `Qwen2_5_VisionTransformerPretrainedModel` loads its `visual.*`
weights, ours loads the same tensors through `convert.mapping` (`to_megatron`) in gloo ranks.
Input: two PIL images of different sizes through the checkpoint's image processor, in one call;
their patch grids 8x12 and 10x14 are 4x6 and 5x7 merge units, so both have windows padded at
the right edge (the second at the bottom too) and the images differ in window count.
Checked, fp32:
- max |ours - HF| of the merged embeddings <= 1e-5;
- after loss = sum(output^2), the gradient of `linear_qkv.weight` of each block (windowed and
  full attention), gathered over TP and mapped back with `to_hf`, is HF's `attn.qkv.weight`
  gradient within 1e-4 relative (max abs difference / max abs HF gradient).

Run: .venv/bin/python -m pytest tests/integration/test_vision_parity.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_revisual.parallel import run_distributed

pytestmark = pytest.mark.integration

IMAGE_SIZES = [(168, 112), (196, 140)]  # PIL (width, height) -> grids [1, 8, 12], [1, 10, 14]
EXPECTED_GRIDS = [[1, 8, 12], [1, 10, 14]]
# The tiny checkpoint's std-0.02 weights give near-uniform attention, which hides wrong rope or
# window bounds in the output; a larger QKV (in both models) sharpens it.
QKV_SCALE = 4.0
OUTPUT_TOLERANCE = 1e-5
GRAD_REL_TOLERANCE = 1e-4


def _vision_config(ckpt: Path):
    from megatron_revisual.config.schema import VisionConfig

    raw = json.loads((ckpt / "config.json").read_text())
    v = raw["vision_config"]
    vision = VisionConfig(
        depth=v["depth"],
        hidden_size=v["hidden_size"],
        num_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"],
        patch_size=v["patch_size"],
        temporal_patch_size=v["temporal_patch_size"],
        spatial_merge_size=v["spatial_merge_size"],
        window_size=v["window_size"],
        fullatt_block_indexes=list(v["fullatt_block_indexes"]),
        in_channels=v["in_channels"],
    )
    return vision, v["out_hidden_size"], raw["text_config"]


def _hf_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "model.safetensors"))
    for name in weights:
        if re.fullmatch(r"visual\.blocks\.\d+\.attn\.qkv\.(weight|bias)", name):
            weights[name] = weights[name] * QKV_SCALE
    return weights


def _mapping(ckpt: Path, tp: int):
    from megatron_revisual.convert.mapping import (
        AttentionShape,
        MappingContext,
        padded_vocab_size,
    )
    from megatron_revisual.models.qwen25_vl.hf_mapping import qwen25_vl_rules

    vision, _, text = _vision_config(ckpt)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    ctx = MappingContext(
        tp_size=tp,
        lm=AttentionShape(text["num_attention_heads"], text["num_key_value_heads"], head_dim),
        vision=AttentionShape(
            vision.num_heads, vision.num_heads, vision.hidden_size // vision.num_heads
        ),
        vocab_size=text["vocab_size"],
        padded_vocab_size=padded_vocab_size(text["vocab_size"], tp),
    )
    rules = qwen25_vl_rules(
        num_layers=text["num_hidden_layers"],
        vision_depth=vision.depth,
        tie_word_embeddings=False,
    )
    prefix = "vision_model."
    return ctx, {r.megatron[len(prefix) :]: r for r in rules if r.megatron.startswith(prefix)}


def _vision_on_rank(ckpt: str, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> dict:
    """Build our tower, load the HF weights through the mapping, forward + backward."""
    from megatron.core import parallel_state

    from megatron_revisual.config.schema import ParallelConfig
    from megatron_revisual.convert.mapping import to_megatron
    from megatron_revisual.models.qwen25_vl.vision import (
        Qwen25VisionModel,
        vision_transformer_config,
    )

    ckpt_dir = Path(ckpt)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    vision, out_hidden, _ = _vision_config(ckpt_dir)
    config = vision_transformer_config(
        vision, ParallelConfig(tensor_model_parallel_size=tp), torch.float32
    )
    model = Qwen25VisionModel(config, vision, out_hidden)
    ctx, rules = _mapping(ckpt_dir, tp)
    hf = _hf_weights(ckpt_dir)
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(rules), (sorted(params), sorted(rules))
    with torch.no_grad():
        for name, param in params.items():
            rule = rules[name]
            param.copy_(to_megatron(rule, [hf[n] for n in rule.hf], ctx, tp_rank))

    model.eval()
    out = model(pixel_values, grid_thw)
    out.pow(2).sum().backward()
    qkv = [f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in range(vision.depth)]
    return {"out": out.detach(), "grads": {n: params[n].grad.clone() for n in qkv}}


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory) -> dict:
    from PIL import Image
    from transformers import AutoConfig, Qwen2VLImageProcessor
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("vision") / "tiny-vl", seed=0)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        for w, h in IMAGE_SIZES
    ]
    processed = Qwen2VLImageProcessor.from_pretrained(ckpt)(images=images, return_tensors="pt")
    pixel_values = processed["pixel_values"].float()
    grid_thw = processed["image_grid_thw"]
    assert grid_thw.tolist() == EXPECTED_GRIDS

    config = AutoConfig.from_pretrained(ckpt)
    visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(
        config.vision_config, dtype=torch.float32
    )
    prefix = "visual."
    weights = _hf_weights(ckpt)
    visual.load_state_dict(
        {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True
    )
    visual.eval()
    out = visual(pixel_values, grid_thw=grid_thw).pooler_output
    out.pow(2).sum().backward()
    grads = {i: blk.attn.qkv.weight.grad.clone() for i, blk in enumerate(visual.blocks)}
    return {
        "ckpt": ckpt,
        "pixel_values": pixel_values,
        "grid_thw": grid_thw,
        "out": out.detach(),
        "grads": grads,
    }


@pytest.mark.parametrize("tp", [1, 2])
def test_vision_tower_matches_hf(tp: int, hf_case: dict) -> None:
    from megatron_revisual.convert.mapping import to_hf

    results = run_distributed(
        _vision_on_rank,
        world_size=tp,
        tp=tp,
        args=(str(hf_case["ckpt"]), hf_case["pixel_values"], hf_case["grid_thw"]),
        timeout_s=300,
    )
    hf_out = hf_case["out"]
    units = sum(t * h * w for t, h, w in EXPECTED_GRIDS) // 4
    assert hf_out.shape == (units, 128)
    assert hf_out.abs().max() > 0.1  # the comparison below is not trivially small
    for rank, result in enumerate(results):
        diff = (result["out"] - hf_out).abs().max().item()
        print(f"TP={tp} rank {rank}: max |ours - HF| = {diff:.3e}")
        assert diff <= OUTPUT_TOLERANCE, f"TP={tp} rank {rank}: max |diff| {diff:.3e}"

    ctx, rules = _mapping(hf_case["ckpt"], tp)
    for layer, hf_grad in hf_case["grads"].items():
        name = f"decoder.layers.{layer}.self_attention.linear_qkv.weight"
        (ours,) = to_hf(rules[name], [r["grads"][name] for r in results], ctx)
        rel = ((ours - hf_grad).abs().max() / hf_grad.abs().max()).item()
        print(f"TP={tp} layer {layer} qkv grad: max |diff| / max |HF| = {rel:.3e}")
        assert rel <= GRAD_REL_TOLERANCE, f"TP={tp} layer {layer}: relative grad diff {rel:.3e}"
