"""pack_sequences: exact boundaries, per-sequence M-RoPE positions, labels and loss mask at
sequence boundaries and padding, vision inputs in packing order."""

from __future__ import annotations

import pytest
import torch

from megatron_revisual.data.packing import Sample, pack_sequences
from megatron_revisual.models.qwen25_vl.rope_index import MRopeIndexConfig, rope_index

CFG = MRopeIndexConfig(image_token_id=90, video_token_id=91, spatial_merge_size=2, tokens_per_second=2)
IMG, VID = CFG.image_token_id, CFG.video_token_id


def _ids(*parts: list[int]) -> torch.Tensor:
    return torch.tensor([t for p in parts for t in p], dtype=torch.long)


def _samples() -> list[Sample]:
    gen = torch.Generator().manual_seed(0)
    grid_a, grid_c = torch.tensor([[1, 4, 6]]), torch.tensor([[1, 10, 14], [1, 2, 2]])
    video = torch.tensor([[2, 4, 4]])
    return [
        # text, one 4x6-patch image (6 tokens), text: 11 tokens
        Sample(input_ids=_ids([1, 2, 3], [IMG] * 6, [4, 5]),
               pixel_values=torch.randn(24, 8, generator=gen), image_grid_thw=grid_a),
        # text only: 5 tokens
        Sample(input_ids=_ids([6, 7, 8, 9, 10])),
        # 10x14 image (35 tokens) then a 2x2 image (1 token) back to back, text: 39 tokens
        Sample(input_ids=_ids([11], [IMG] * 36, [12, 13]),
               pixel_values=torch.randn(144, 8, generator=gen), image_grid_thw=grid_c),
        # a 2-frame video (8 tokens) at 0.5 s per grid step, text: 10 tokens
        Sample(input_ids=_ids([14], [VID] * 8, [15]), pixel_values_videos=torch.randn(32, 8, generator=gen),
               video_grid_thw=video, second_per_grid_ts=torch.tensor([0.5])),
    ]


def _per_sample_positions(samples: list[Sample]) -> list[torch.Tensor]:
    return [
        rope_index(s.input_ids[None], s.image_grid_thw, s.video_grid_thw, s.second_per_grid_ts, config=CFG)[0][:, 0]
        for s in samples
    ]


def test_unpadded_row_boundaries_positions_labels():
    samples = _samples()
    batch = pack_sequences(samples, config=CFG)
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 11, 16, 55, 65]
    assert batch.cu_seqlens_padded.tolist() == [0, 11, 16, 55, 65]
    assert batch.input_ids.shape == (1, 65) and batch.position_ids.shape == (3, 1, 65)
    assert torch.equal(batch.input_ids[0], torch.cat([s.input_ids for s in samples]))

    # positions equal each sample's own rope index, concatenated (restart at 0 per sequence)
    assert torch.equal(batch.position_ids[:, 0], torch.cat(_per_sample_positions(samples), dim=1))
    assert batch.position_ids[:, 0, [0, 11, 16, 55]].tolist() == [[0] * 4] * 3
    # the video: temporal positions 0 and int(1 * 2 * 0.5) = 1 after the first text token
    assert batch.position_ids[0, 0, 56:64].tolist() == [1, 1, 1, 1, 2, 2, 2, 2]

    # next-token labels inside each sequence; the last token of each sequence is masked
    ids = batch.input_ids[0]
    mask = batch.loss_mask[0]
    assert mask.dtype == torch.float32
    assert (mask == 0).nonzero().flatten().tolist() == [10, 15, 54, 64]
    keep = mask.bool()
    assert torch.equal(batch.labels[0][keep], torch.cat([ids[1:], ids[:1]])[keep])
    assert batch.labels[0, [10, 15, 54, 64]].tolist() == [0, 0, 0, 0]

    # vision inputs concatenated in packing order
    assert torch.equal(batch.pixel_values, torch.cat([samples[0].pixel_values, samples[2].pixel_values]))
    assert batch.image_grid_thw.tolist() == [[1, 4, 6], [1, 10, 14], [1, 2, 2]]
    assert batch.video_grid_thw.tolist() == [[2, 4, 4]]
    assert batch.second_per_grid_ts.tolist() == [0.5]
    assert batch.rope_deltas.flatten().tolist() == [-3, 0, -28, -6]

    params = batch.packed_seq_params
    assert params.qkv_format == "thd" and params.max_seqlen_q == 39
    assert params.cu_seqlens_q is batch.cu_seqlens and params.cu_seqlens_kv_padded is batch.cu_seqlens_padded


def test_target_mask_selects_predicted_tokens():
    prompt_then_answer = Sample(input_ids=_ids([1, 2, 3, 4, 5]),
                                target_mask=torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool))
    batch = pack_sequences([Sample(input_ids=_ids([6, 7])), prompt_then_answer], config=CFG)
    # token j predicts j + 1: the answer tokens (3, 4 of sample 1) are predicted from 2 and 3
    assert batch.loss_mask[0].tolist() == [1, 0, 0, 0, 1, 1, 0]


def test_padding_to_a_multiple_for_sequence_parallel():
    samples = _samples()
    batch = pack_sequences(samples, config=CFG, pad_to_multiple_of=4, pad_token_id=7)
    assert batch.cu_seqlens.tolist() == [0, 11, 16, 55, 65]
    assert batch.cu_seqlens_padded.tolist() == [0, 11, 16, 55, 68]  # only the last sequence grows
    assert batch.input_ids[0, 65:].tolist() == [7, 7, 7]
    assert batch.loss_mask[0, 64:].tolist() == [0, 0, 0, 0]
    assert batch.labels[0, 65:].tolist() == [0, 0, 0]
    assert batch.position_ids[:, 0, 65:].tolist() == [[0] * 3] * 3
    assert batch.num_real_tokens == 65 and batch.packed_seq_params.max_seqlen_q == 39


def test_context_parallel_padding_per_sequence():
    samples = _samples()
    batch = pack_sequences(samples, config=CFG, cp_size=2, pad_to_multiple_of=8)
    # every sequence a multiple of 2 * cp = 4 ([12, 8, 40, 12] -> 72); the row then a multiple
    # of 8 (already), so the last sequence keeps its CP padding only
    assert batch.cu_seqlens_padded.tolist() == [0, 12, 20, 60, 72]
    real = torch.zeros(72, dtype=torch.bool)
    for s, n in zip(batch.cu_seqlens_padded[:-1].tolist(), batch.seq_lengths, strict=True):
        real[s : s + n] = True
    assert (real == 0).nonzero().flatten().tolist() == [11, 17, 18, 19, 59, 70, 71]
    assert batch.loss_mask[0][~real].abs().sum() == 0
    assert batch.input_ids[0][~real].tolist() == [0] * 7
    positions = _per_sample_positions(samples)
    for got, want in zip(batch.unpack(batch.position_ids, dim=-1), positions, strict=True):
        assert torch.equal(got[:, 0], want)
    for got, want in zip(batch.unpack(batch.input_ids), samples, strict=True):
        assert torch.equal(got[0], want.input_ids)
    # last real token of every sequence predicts nothing
    assert batch.loss_mask[0, [10, 16, 58, 69]].tolist() == [0, 0, 0, 0]
    assert batch.loss_mask[0][real].sum().item() == 65 - 4

    odd = pack_sequences(samples, config=CFG, cp_size=2, pad_to_multiple_of=5)
    assert odd.cu_seqlens_padded.tolist() == [0, 12, 20, 60, 80]  # lcm(5, 4) = 20


def test_text_only_positions_without_mrope():
    batch = pack_sequences([Sample(input_ids=_ids([1, 2, 3])), Sample(input_ids=_ids([4, 5]))],
                           config=None, pad_to_multiple_of=3)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch.rope_deltas is None


def test_errors_name_the_sample():
    bad = Sample(input_ids=_ids([1], [IMG] * 5), pixel_values=torch.zeros(24, 8),
                 image_grid_thw=torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match=r"sample 1: input_ids hold 5 image placeholder tokens .* describes 6"):
        pack_sequences([Sample(input_ids=_ids([1])), bad], config=CFG)
    with pytest.raises(ValueError, match="sample 0: image pixels and grid_thw must be given together"):
        pack_sequences([Sample(input_ids=_ids([1]), pixel_values=torch.zeros(4, 8))], config=CFG)
    with pytest.raises(ValueError, match="pad_token_id=90 is an image/video placeholder id"):
        pack_sequences([Sample(input_ids=_ids([1]))], config=CFG, pad_token_id=IMG)
