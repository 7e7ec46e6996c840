"""Window order, its inverse, frame bounds and 2D rope positions of the vision tower.

By hand on a small grid, then against the functions and rotary module Hugging Face's
Qwen2.5-VL vision tower itself uses, on grids that include padded windows, a grid that is an
exact multiple of the window (HF drops empty windows there) and a two-frame video.
"""

import pytest
import torch

from megatron_revisual.models.qwen25_vl.vision import (
    inverse_permutation,
    vision_frame_cu_seqlens,
    vision_position_ids,
    vision_rotary_angles,
    vision_window_index,
)

MERGE, PATCH = 2, 14

HF_GRIDS = {
    "two_images_padded": [[1, 8, 12], [1, 10, 14]],
    "exact_multiple": [[1, 16, 16]],
    "video_and_image": [[2, 4, 6], [1, 8, 8]],
    "tall_thin": [[1, 18, 2], [1, 2, 30]],
}


def test_window_index_by_hand():
    # grid 4x6 patches = 2x3 merge units; window 56 px = 2x2 units. Units, row-major:
    #   0 1 | 2
    #   3 4 | 5
    # window 0 = units 0,1,3,4 (16 patches), window 1 = units 2,5 (8 patches, padded window)
    index, cu = vision_window_index(
        torch.tensor([[1, 4, 6]]), spatial_merge_size=MERGE, window_size=56, patch_size=PATCH
    )
    assert index.tolist() == [0, 1, 3, 4, 2, 5]
    assert cu.tolist() == [0, 16, 24]
    assert cu.dtype == torch.int32


def test_window_index_offsets_across_images_and_frames():
    # two frames of 2x2 units each, window 1x1 unit: every unit its own window, in order
    index, cu = vision_window_index(
        torch.tensor([[2, 4, 4]]), spatial_merge_size=MERGE, window_size=28, patch_size=PATCH
    )
    assert index.tolist() == list(range(8))
    assert cu.tolist() == [4 * i for i in range(9)]
    assert vision_frame_cu_seqlens(torch.tensor([[2, 4, 4], [1, 2, 6]])).tolist() == [0, 16, 32, 44]


def test_position_ids_by_hand():
    pos = vision_position_ids(torch.tensor([[1, 4, 6]]), MERGE)
    assert pos.shape == (24, 2)
    # unit (0,0), then unit (0,1): each unit's 2x2 patches row-major
    assert pos[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    # last unit (1,2) covers rows 2-3, columns 4-5
    assert pos[-4:].tolist() == [[2, 4], [2, 5], [3, 4], [3, 5]]
    # a second frame repeats the first
    video = vision_position_ids(torch.tensor([[2, 4, 6]]), MERGE)
    assert torch.equal(video[:24], pos) and torch.equal(video[24:], pos)


def test_rotary_angles_by_hand():
    angles = vision_rotary_angles(torch.tensor([[3, 5]]), head_dim=8)
    f = [1.0, 10_000.0 ** -0.5]  # theta^(-4i/head_dim), i < head_dim/4
    expected = [3 * f[0], 3 * f[1], 5 * f[0], 5 * f[1]] * 2
    assert torch.allclose(angles[0], torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_inverse_permutation_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(37, generator=gen)
    x = torch.randn(37, 3, generator=gen)
    inv = inverse_permutation(perm)
    assert torch.equal(x[perm][inv], x)
    assert torch.equal(inv, torch.argsort(perm))


@pytest.mark.parametrize("name", sorted(HF_GRIDS))
def test_window_round_trip_on_real_grids(name):
    grid = torch.tensor(HF_GRIDS[name])
    index, cu = vision_window_index(grid, spatial_merge_size=MERGE, window_size=112, patch_size=PATCH)
    units = int(grid.prod(dim=1).sum()) // MERGE**2
    assert sorted(index.tolist()) == list(range(units))  # a permutation
    assert int(cu[-1]) == units * MERGE**2
    assert bool((cu[1:] > cu[:-1]).all())  # no empty window
    x = torch.arange(units)
    assert torch.equal(x[index][inverse_permutation(index)], x)
    # every window lies inside one frame: frame bounds are window bounds
    assert set(vision_frame_cu_seqlens(grid).tolist()) <= set(cu.tolist())


@pytest.fixture(scope="module")
def hf_vision():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    config = Qwen2_5_VLVisionConfig(
        depth=1, hidden_size=64, num_heads=2, intermediate_size=32, out_hidden_size=32,
        patch_size=PATCH, spatial_merge_size=MERGE, window_size=112, fullatt_block_indexes=[0],
    )
    return Qwen2_5_VisionTransformerPretrainedModel(config)


@pytest.mark.parametrize("name", sorted(HF_GRIDS))
def test_matches_hf_window_index_and_rope(name, hf_vision):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    grid = torch.tensor(HF_GRIDS[name])
    hf_index, hf_cu = get_vision_window_index(
        grid, spatial_merge_size=MERGE, window_size=112, patch_size=PATCH
    )
    index, cu = vision_window_index(grid, spatial_merge_size=MERGE, window_size=112, patch_size=PATCH)
    assert torch.equal(index, hf_index)
    assert torch.equal(cu, hf_cu)

    hf_pos = get_vision_position_ids(grid, MERGE)
    pos = vision_position_ids(grid, MERGE)
    assert torch.equal(pos, hf_pos)

    head_dim = 64 // 2
    hf_cos, hf_sin = hf_vision.rotary_pos_emb(torch.zeros(1), hf_pos)
    angles = vision_rotary_angles(pos, head_dim)
    assert angles.shape == hf_cos.shape == (len(pos), head_dim)
    assert torch.allclose(angles.cos(), hf_cos, rtol=0, atol=1e-6)
    assert torch.allclose(angles.sin(), hf_sin, rtol=0, atol=1e-6)


def test_bad_grid_is_named():
    with pytest.raises(ValueError, match=r"grid_thw\[1\] = \[1, 5, 4\]"):
        vision_position_ids(torch.tensor([[1, 4, 4], [1, 5, 4]]), MERGE)
    with pytest.raises(ValueError, match="no images"):
        vision_window_index(
            torch.zeros(0, 3, dtype=torch.long), spatial_merge_size=MERGE, window_size=112,
            patch_size=PATCH,
        )


def test_tp_that_cannot_shard_the_tower_names_legal_sizes():
    from megatron_revisual.config.schema import ParallelConfig, VisionConfig
    from megatron_revisual.models.qwen25_vl.vision import vision_transformer_config

    # 3B / 7B: 16 heads, MLP width 3420, merger width 5120
    with pytest.raises(ValueError, match=r"tp=8 .*intermediate_size.: 3420.*use tp in \[1, 2, 4\]"):
        vision_transformer_config(
            VisionConfig(), ParallelConfig(tensor_model_parallel_size=8), torch.bfloat16
        )
    config = vision_transformer_config(
        VisionConfig(), ParallelConfig(tensor_model_parallel_size=4), torch.bfloat16
    )
    assert (config.num_query_groups, config.kv_channels, config.ffn_hidden_size) == (16, 80, 3420)
