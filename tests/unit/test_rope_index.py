"""Our M-RoPE index equals transformers' Qwen2.5-VL `get_rope_index`, integer for integer."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_revisual.models.qwen25_vl.rope_index import (
    MRopeIndexConfig,
    decode_position_ids,
    packed_rope_index,
    rope_index,
)

PAD, VISION_START, VISION_END, IMAGE, VIDEO = 0, 3, 4, 5, 6
FIRST_TEXT, VOCAB = 7, 64
TOKENS_PER_SECOND = 2


@pytest.fixture(scope="module")
def hf_model():
    """A tiny Qwen2_5_VLForConditionalGeneration: only its config and methods are used."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [4, 6, 6],
            },
            "pad_token_id": PAD,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [0],
            "spatial_merge_size": 2,
            "tokens_per_second": TOKENS_PER_SECOND,
        },
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def cfg(hf_model) -> MRopeIndexConfig:
    return MRopeIndexConfig.from_hf_config(hf_model.config)


def make_row(segments: list, rng: random.Random) -> list[int]:
    """Token ids for [("text", n) | ("image", (t, h, w)) | ("video", (t, h, w)), ...]."""
    ids: list[int] = []
    for kind, arg in segments:
        if kind == "text":
            ids += [rng.randrange(FIRST_TEXT, VOCAB) for _ in range(arg)]
        else:
            t, h, w = arg
            ids += [VISION_START, *[IMAGE if kind == "image" else VIDEO] * (t * h * w // 4)]
            ids.append(VISION_END)
    return ids


def batch(rows: list[list[int]], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows to one length; returns input_ids and attention_mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    return ids, mask


def hf_rope_index(model, input_ids, image_grid_thw=None, video_grid_thw=None, spg=None, mask=None):
    # The processor marks placeholders by modality (transformers' create_mm_token_type_ids).
    mm_types = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
    return model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_types,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=spg,
        attention_mask=mask,
    )


def grids(*thw) -> torch.Tensor | None:
    return torch.tensor(thw, dtype=torch.long) if thw else None


def assert_same(hf_model, cfg, rows, images=(), videos=(), spg=None, side=None):
    """Our result equals transformers' for the padded batch (mask given iff side is set)."""
    ids, mask = batch(rows, side or "right")
    mask = mask if side else None
    image_grid, video_grid = grids(*images), grids(*videos)
    want_pos, want_delta = hf_rope_index(hf_model, ids, image_grid, video_grid, spg, mask)
    got_pos, got_delta = rope_index(ids, image_grid, video_grid, spg, mask, config=cfg)
    assert got_pos.shape == (3, *ids.shape) and got_delta.shape == (len(rows), 1)
    assert torch.equal(got_pos, want_pos), (got_pos, want_pos)
    assert torch.equal(got_delta, want_delta.to(torch.long)), (got_delta, want_delta)
    return got_pos, got_delta


def test_text_only_rows(hf_model, cfg):
    rng = random.Random(0)
    rows = [make_row([("text", 7)], rng), make_row([("text", 4)], rng)]
    for side in (None, "left", "right"):
        rows_same = [rows[0], rows[0][:7]] if side is None else rows
        pos, delta = assert_same(hf_model, cfg, rows_same, side=side)
    # left padding: positions count attended tokens only, pads are 0
    assert pos[:, 1].tolist() == [[0, 1, 2, 3, 0, 0, 0]] * 3
    assert delta.flatten().tolist() == [0, 0]


def test_one_image(hf_model, cfg):
    rng = random.Random(1)
    row = make_row([("text", 3), ("image", (1, 4, 6)), ("text", 5)], rng)
    pos, delta = assert_same(hf_model, cfg, [row], images=[(1, 4, 6)])
    # text resumes at image start + max(h, w) / merge = 4 + 3
    assert pos[:, 0, 4 + 6].tolist() == [4 + 3] * 3
    assert delta.item() == int(pos.max()) + 1 - len(row)


def test_two_images_of_different_sizes(hf_model, cfg):
    rng = random.Random(2)
    row = make_row([("text", 2), ("image", (1, 4, 6)), ("text", 3), ("image", (1, 8, 4))], rng)
    assert_same(hf_model, cfg, [row + make_row([("text", 2)], rng)], images=[(1, 4, 6), (1, 8, 4)])


@pytest.mark.parametrize("seconds", [None, [0.5, 2.0], [0.7, 1.3]])
def test_videos_with_second_per_grid_ts(hf_model, cfg, seconds):
    rng = random.Random(3)
    videos = [(3, 4, 4), (4, 2, 6)]
    row = make_row(
        [("text", 2), ("video", videos[0]), ("text", 1), ("video", videos[1]), ("text", 3)], rng
    )
    spg = None if seconds is None else torch.tensor(seconds)  # float32, as the processor's
    pos, _ = assert_same(hf_model, cfg, [row], videos=videos, spg=spg)
    if seconds == [0.5, 2.0]:
        # second video: interval 2 * 2.0 = 4. Its tokens start at index 2+1+12+1+1+1 = 18; its
        # position is 8 (text 0-1, <vs> 2, first video 3 advancing max(4, 4)/2, <ve> 5, text 6,
        # <vs> 7), so its 4 frames of 1x3 tokens sit at temporal 8, 12, 16, 20.
        first, frame_tokens = 18, 3
        assert pos[0, 0, first : first + 4 * frame_tokens : frame_tokens].tolist() == [
            8,
            12,
            16,
            20,
        ]


def test_image_and_video_in_one_row(hf_model, cfg):
    rng = random.Random(4)
    row = make_row([("text", 3), ("video", (2, 4, 4)), ("text", 2), ("image", (1, 6, 4))], rng)
    assert_same(
        hf_model, cfg, [row], images=[(1, 6, 4)], videos=[(2, 4, 4)], spg=torch.tensor([1.5])
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_mixed_text_only_rows(hf_model, cfg, side):
    rng = random.Random(5)
    rows = [
        make_row([("text", 4), ("image", (1, 4, 4)), ("text", 2)], rng),
        make_row([("text", 9)], rng),
        make_row([("text", 1), ("image", (1, 2, 6)), ("video", (2, 2, 2)), ("text", 6)], rng),
        make_row([("text", 3)], rng),
    ]
    images, videos = [(1, 4, 4), (1, 2, 6)], [(2, 2, 2)]
    spg = torch.tensor([2.0])
    pos, delta = assert_same(hf_model, cfg, rows, images, videos, spg, side=side)
    assert delta[1].item() == 0 and delta[3].item() == 0  # text-only rows


def test_random_batches(hf_model, cfg):
    rng = random.Random(6)
    for _ in range(8):
        rows, images, videos, seconds = [], [], [], []
        for _ in range(rng.randint(1, 4)):
            segments = [("text", rng.randint(1, 5))]
            for _ in range(rng.randint(0, 3)):
                kind = rng.choice(["image", "video"])
                t = 1 if kind == "image" else rng.randint(1, 4)
                grid = (t, 2 * rng.randint(1, 4), 2 * rng.randint(1, 4))
                (images if kind == "image" else videos).append(grid)
                if kind == "video":
                    seconds.append(rng.choice([0.5, 1.0, 2.0, rng.uniform(0.1, 3.0)]))
                segments += [(kind, grid), ("text", rng.randint(0, 4))]
            rows.append(make_row(segments, rng))
        spg = torch.tensor(seconds) if seconds else None
        assert_same(hf_model, cfg, rows, images, videos, spg, side=rng.choice(["left", "right"]))


def test_packed_equals_concatenated_per_sequence_results(hf_model, cfg):
    rng = random.Random(7)
    sequences = [  # (segments, images, videos, seconds)
        ([("text", 5)], [], [], []),
        ([("text", 2), ("image", (1, 4, 6)), ("text", 3)], [(1, 4, 6)], [], []),
        ([("text", 1), ("video", (3, 4, 2)), ("image", (1, 2, 2)), ("text", 2)],
         [(1, 2, 2)], [(3, 4, 2)], [2.0]),
        ([("image", (1, 8, 4)), ("text", 1), ("image", (1, 2, 4)), ("text", 4)],
         [(1, 8, 4), (1, 2, 4)], [], []),
        ([("text", 2), ("video", (2, 2, 2)), ("text", 1)], [], [(2, 2, 2)], [0.5]),
    ]  # fmt: skip
    want_pos, want_delta, packed, lengths = [], [], [], []
    for segments, images, videos, seconds in sequences:
        row = make_row(segments, rng)
        spg = torch.tensor(seconds) if seconds else None
        pos, delta = hf_rope_index(
            hf_model, torch.tensor([row]), grids(*images), grids(*videos), spg
        )
        want_pos.append(pos)
        want_delta.append(delta)
        packed += row
        lengths.append(len(row))
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    all_images = grids(*[g for s in sequences for g in s[1]])
    all_videos = grids(*[g for s in sequences for g in s[2]])
    all_seconds = torch.tensor([x for s in sequences for x in s[3]])
    got_pos, got_delta = packed_rope_index(
        torch.tensor([packed]), cu_seqlens, all_images, all_videos, all_seconds, config=cfg
    )
    assert got_pos.shape == (3, 1, len(packed))
    assert torch.equal(got_pos, torch.cat(want_pos, dim=2))
    assert torch.equal(got_delta, torch.cat(want_delta).to(torch.long))
    # positions restart at 0 for every sequence
    assert got_pos[:, 0, cu_seqlens[:-1]].eq(0).all()


def test_decode_positions_match_hf_generation(hf_model, cfg):
    rng = random.Random(8)
    rows = [
        make_row([("text", 2), ("image", (1, 4, 6)), ("text", 2)], rng),
        make_row([("text", 3)], rng),
        make_row([("text", 1), ("video", (4, 2, 2)), ("text", 1)], rng),
    ]
    ids, mask = batch(rows, "left")
    images, videos, spg = grids((1, 4, 6)), grids((4, 2, 2)), torch.tensor([2.0])
    prompt_pos, deltas = rope_index(ids, images, videos, spg, mask, config=cfg)

    class Cache:  # what transformers asks of a KV cache here
        def __init__(self, length: int) -> None:
            self.length = length

        def get_seq_length(self) -> int:
            return self.length

    prompt_len, steps = ids.shape[1], 3
    full_mask = torch.cat([mask, torch.ones(len(rows), steps, dtype=mask.dtype)], dim=1)
    hf_model.model.rope_deltas = deltas
    for with_mask in (True, False):
        kwargs = {"past_key_values": Cache(prompt_len)}
        if with_mask:
            kwargs["attention_mask"] = full_mask
        want = hf_model._prepare_position_ids_for_generation(
            torch.zeros(len(rows), steps, dtype=torch.long), kwargs
        )
        cache_position = torch.arange(prompt_len, prompt_len + steps)
        got = decode_position_ids(deltas, cache_position, full_mask if with_mask else None)
        assert got.shape == (3, len(rows), steps)
        assert torch.equal(got, want[..., -steps:].expand(3, -1, -1))
    # with the mask, every row's first new token follows its largest prompt position
    got = decode_position_ids(deltas, torch.tensor([prompt_len]), full_mask)
    assert got[:, :, 0].tolist() == [(prompt_pos.amax(dim=(0, 2)) + 1).tolist()] * 3


def test_placeholder_count_mismatch_names_both_counts(cfg):
    rng = random.Random(9)
    ids = torch.tensor([make_row([("text", 2), ("image", (1, 4, 4))], rng)])
    with pytest.raises(ValueError, match=r"4 image placeholder tokens .* describes 6"):
        rope_index(ids, grids((1, 4, 6)), config=cfg)
    with pytest.raises(ValueError, match=r"4 image placeholder tokens .* describes 0"):
        rope_index(ids, config=cfg)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_rope_index(ids, [0, 3], grids((1, 4, 4)), config=cfg)
