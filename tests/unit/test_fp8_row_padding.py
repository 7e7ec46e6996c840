"""FP8-safe packing: every rank's share of a packed row meets the FP8 recipe's token block.

Transformer Engine's FP8 GEMMs need the token count each rank multiplies to be a multiple of 16
(delayed, tensorwise), 32 (mxfp8) or 128 (blockwise). Rows used to be padded only to a multiple
of TP, so a 65-token row under FP8 would have reached TE unaligned.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_revisual.data.packing import (
    FP8_TOKEN_MULTIPLE,
    Sample,
    pack_sequences,
    row_length_multiple,
)
from megatron_revisual.models.qwen25_vl.rope_index import MRopeIndexConfig

CFG = MRopeIndexConfig(image_token_id=90, video_token_id=91, spatial_merge_size=2, tokens_per_second=2)
LENGTHS = [11, 5, 39, 10]  # 65 tokens: aligned to nothing

RECIPES = ["delayed", "tensorwise", "mxfp8", "blockwise"]


def test_the_recipes_blocks():
    assert FP8_TOKEN_MULTIPLE == {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}


@pytest.mark.parametrize(
    ("recipe", "tp", "sp", "cp", "expected"),
    [
        (None, 1, False, 1, 1),
        (None, 4, True, 1, 4),
        (None, 4, False, 1, 1),
        (None, 2, True, 2, 8),
        ("delayed", 1, False, 1, 16),
        ("delayed", 2, True, 1, 32),
        ("delayed", 2, False, 1, 16),  # without SP every TP rank holds the whole row
        ("tensorwise", 8, True, 1, 128),
        ("tensorwise", 2, True, 2, 128),  # 16 x TP 2 x 2·CP 4
        ("mxfp8", 1, False, 1, 32),
        ("mxfp8", 4, True, 1, 128),
        ("mxfp8", 2, True, 4, 512),
        ("blockwise", 1, False, 1, 128),
        ("blockwise", 2, True, 1, 256),
        ("blockwise", 1, False, 2, 512),
        ("blockwise", 8, True, 2, 4096),
    ],
)
def test_row_length_multiple(recipe, tp, sp, cp, expected):
    assert row_length_multiple(tp=tp, sequence_parallel=sp, cp=cp, fp8_recipe=recipe) == expected


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(("tp", "sp", "cp"), [(1, False, 1), (2, True, 1), (4, True, 1), (2, True, 2), (1, False, 2)])
def test_every_rank_s_share_of_a_packed_row_is_fp8_aligned(recipe, tp, sp, cp):
    samples = [Sample(input_ids=torch.arange(1, n + 1)) for n in LENGTHS]
    multiple = row_length_multiple(tp=tp, sequence_parallel=sp, cp=cp, fp8_recipe=recipe)
    batch = pack_sequences(samples, config=CFG, pad_to_multiple_of=multiple, cp_size=cp)
    total = batch.input_ids.shape[1]
    # the smallest such row: each sequence padded to 2·CP, then the row up to the multiple
    unpadded = sum(math.ceil(n / (2 * cp)) * 2 * cp if cp > 1 else n for n in LENGTHS)
    assert total == math.ceil(unpadded / multiple) * multiple
    per_rank = total // cp // (tp if sp else 1)  # tokens one rank's GEMMs see
    assert per_rank * cp * (tp if sp else 1) == total
    assert per_rank % FP8_TOKEN_MULTIPLE[recipe] == 0
    if cp > 1:  # every sequence still splits into 2 * CP equal chunks
        lengths = (batch.cu_seqlens_padded[1:] - batch.cu_seqlens_padded[:-1]).tolist()
        assert all(n % (2 * cp) == 0 for n in lengths)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="fp8_recipe='fp4'"):
        row_length_multiple(tp=1, sequence_parallel=False, cp=1, fp8_recipe="fp4")
    with pytest.raises(ValueError, match="tp=0"):
        row_length_multiple(tp=0, sequence_parallel=False, cp=1, fp8_recipe=None)


def test_the_7b_recipe_with_fp8_pads_rows_for_its_tp_and_recipe():
    from megatron_revisual.config.loader import load_config
    from megatron_revisual.train.stage_common import row_multiple

    recipe = Path(__file__).parents[2] / "configs" / "qwen25_vl_7b_8xh100.yaml"
    cfg = load_config(recipe)  # TP 4 with SP, fp8 hybrid, delayed recipe
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel) == (4, True)
    assert row_multiple(cfg) == 64
    assert row_multiple(load_config(recipe, ["precision.fp8_recipe=blockwise"])) == 512
    assert row_multiple(load_config(recipe, ["precision.fp8=null"])) == 4
