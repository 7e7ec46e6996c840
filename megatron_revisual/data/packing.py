"""Pack variable-length samples into one THD row: batch 1, T tokens, `cu_seqlens` boundaries.

    batch = pack_sequences(samples, config=MRopeIndexConfig.from_hf_config(hf_config),
                           pad_to_multiple_of=tp)            # tp for sequence parallel
    loss = model(batch.input_ids, batch.position_ids, labels=batch.labels,
                 pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                 packed_seq_params=batch.packed_seq_params)
    per_sample = batch.unpack(loss, dim=1)

Packing removes the padding a padded batch would carry (HF-style batches waste up to
(1 - mean/max) of their tokens when lengths vary). Every sequence is numbered by the M-RoPE
index from 0 as if it were alone (`rope_index.packed_rope_index`), and the attention keeps each
sequence to itself (`models.qwen25_vl.packed_attention`).

Padding, when asked for, goes at the END of a sequence, described by `cu_seqlens_padded`
(Transformer Engine's convention): causal attention inside a segment never lets a real token see
padding after it. Padding tokens carry `pad_token_id`, position 0, label 0 and loss_mask 0.
- `cp_size > 1`: each sequence is padded to a multiple of 2 * cp_size (`parallel.context_parallel.
  pad_for_cp`), the load-balanced CP split's requirement.
- `pad_to_multiple_of`: the whole row is padded to that multiple by lengthening the last
  sequence's padding (sequence parallelism needs T divisible by TP; with CP, each CP rank's
  T / cp_size tokens must divide by TP, so pass tp * cp_size).

`row_length_multiple` gives the `pad_to_multiple_of` a training step needs: TP with sequence
parallelism, 2 * CP with context parallelism, and with FP8 the per-rank token count that
Transformer Engine's FP8 GEMMs need (16 for the delayed and tensorwise recipes, 32 for mxfp8,
128 for blockwise), each rank holding T / (TP * CP) tokens under SP.

Labels are next-token targets inside a sequence: labels[j] = input_ids[j + 1], and the last
token of every sequence has loss_mask 0, so no token is trained to predict the next sequence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_revisual.parallel.context_parallel import pad_for_cp, padded_token_index

# Tokens per rank that a Transformer Engine FP8 GEMM needs as a multiple, by FP8 recipe: the GEMM's
# token dimension is scaled in blocks (mxfp8: 1x32; blockwise: 1x128 and 128x128) or, for the
# per-tensor recipes, must meet the FP8 kernels' 16-element alignment.
FP8_TOKEN_MULTIPLE = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}


def row_length_multiple(*, tp: int, sequence_parallel: bool, cp: int, fp8_recipe: str | None) -> int:
    """The multiple a packed row's length T must be for one training step.

    Under sequence parallelism each TP rank holds T / TP tokens of the row (T / (TP * CP) with
    CP), so those must be a multiple of the FP8 recipe's block; without SP every TP rank holds
    all T. With CP every sequence is split into 2 * CP chunks (load-balanced order), so the row
    is a multiple of 2 * CP times the per-rank multiple. `fp8_recipe` None: no FP8."""
    if tp < 1 or cp < 1:
        raise ValueError(f"tp={tp} and cp={cp} must be >= 1")
    if fp8_recipe is not None and fp8_recipe not in FP8_TOKEN_MULTIPLE:
        raise ValueError(f"fp8_recipe={fp8_recipe!r}: expected one of {sorted(FP8_TOKEN_MULTIPLE)} or None")
    per_rank = FP8_TOKEN_MULTIPLE[fp8_recipe] if fp8_recipe is not None else 1
    multiple = per_rank * (tp if sequence_parallel else 1)
    return multiple * 2 * cp if cp > 1 else multiple


class PositionConfig(Protocol):
    """The model family's position constants (`models.registry.ModelFamily.position_config`,
    e.g. Qwen2.5-VL's `MRopeIndexConfig`): the placeholder token ids, the vision merge size, and
    the multi-dimensional position ids of a packed row."""

    image_token_id: int
    video_token_id: int
    spatial_merge_size: int

    def packed_positions(self, input_ids: torch.Tensor, cu_seqlens: Any, image_grid_thw: Any = None,
                         video_grid_thw: Any = None,
                         second_per_grid_ts: Any = None) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    """One unpadded sequence, image/video placeholders already expanded by the processor.

    target_mask: [L], true where the token is a prediction target (e.g. response tokens only
    for SFT / RL); None means every token. The first token can never be one (nothing precedes it).
    """

    input_ids: torch.Tensor
    target_mask: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackedBatch:
    """One packed row. Token tensors are [1, T] with T the padded total; position_ids are
    [3, 1, T] (M-RoPE) or [1, T] (text-only Qwen2, informative: plain THD rope restarts per
    sequence by itself)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor  # float32, 1 where labels count
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor  # [n + 1] int32, real tokens
    cu_seqlens_padded: torch.Tensor  # [n + 1] int32, segments as laid out in the row
    rope_deltas: torch.Tensor | None  # [n, 1] per sequence (generation continues from these)
    packed_seq_params: PackedSeqParams
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None

    @property
    def seq_lengths(self) -> list[int]:
        return self.cu_seqlens.diff().tolist()

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    def unpack(self, tensor: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        """Per-sample slices (real tokens only) of a tensor laid out like the row on `dim`."""
        dim = dim % tensor.dim()
        if tensor.shape[dim] != int(self.cu_seqlens_padded[-1]):
            raise ValueError(
                f"tensor has {tensor.shape[dim]} tokens on dim {dim}, the packed row "
                f"{int(self.cu_seqlens_padded[-1])}"
            )
        starts = self.cu_seqlens_padded[:-1].tolist()
        return [tensor.narrow(dim, s, n) for s, n in zip(starts, self.seq_lengths, strict=True)]


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [p for p in parts if p is not None]
    return torch.cat(present) if present else None


def _check_sample(i: int, s: Sample, config: PositionConfig | None) -> torch.Tensor:
    ids = s.input_ids
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"sample {i}: input_ids must be a non-empty [L] tensor, got {tuple(s.input_ids.shape)}")
    if s.target_mask is not None and s.target_mask.reshape(-1).shape != ids.shape:
        raise ValueError(
            f"sample {i}: target_mask has {s.target_mask.numel()} entries for {ids.numel()} tokens"
        )
    for kind, pixels, grid in (
        ("image", s.pixel_values, s.image_grid_thw),
        ("video", s.pixel_values_videos, s.video_grid_thw),
    ):
        if (pixels is None) != (grid is None):
            raise ValueError(f"sample {i}: {kind} pixels and grid_thw must be given together")
        if config is None:
            if grid is not None:
                raise ValueError(f"sample {i} has {kind}s but no MRopeIndexConfig was given")
            continue
        token_id = config.image_token_id if kind == "image" else config.video_token_id
        in_ids = int((ids == token_id).sum())
        m = config.spatial_merge_size
        expected = 0 if grid is None else int((grid.prod(-1) // (m * m)).sum())
        if in_ids != expected:
            raise ValueError(
                f"sample {i}: input_ids hold {in_ids} {kind} placeholder tokens (id {token_id}) but "
                f"its {kind}_grid_thw {None if grid is None else grid.tolist()} describes {expected}"
            )
    return ids


def pack_sequences(
    samples: Sequence[Sample],
    *,
    config: PositionConfig | None,
    pad_to_multiple_of: int = 1,
    cp_size: int = 1,
    pad_token_id: int = 0,
) -> PackedBatch:
    """Pack `samples` (in order) into one row; see the module docstring for padding rules.

    Args:
        config: the M-RoPE constants (None for a text-only Qwen2 model with plain rope).
        pad_to_multiple_of: the padded row length is a multiple of this (TP for sequence parallel).
        cp_size: context-parallel size; > 1 pads every sequence to a multiple of 2 * cp_size.
        pad_token_id: id of padding tokens; must not be an image/video placeholder id.
    """
    if not samples:
        raise ValueError("pack_sequences needs at least one sample")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
    if config is not None and pad_token_id in (config.image_token_id, config.video_token_id):
        raise ValueError(f"pad_token_id={pad_token_id} is an image/video placeholder id")
    ids_per_sample = [_check_sample(i, s, config) for i, s in enumerate(samples)]
    lengths = torch.tensor([ids.numel() for ids in ids_per_sample])
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)

    padded_lengths, _ = pad_for_cp(lengths, cp_size)
    multiple = math.lcm(pad_to_multiple_of, 2 * cp_size if cp_size > 1 else 1)
    total = int(padded_lengths.sum())
    padded_lengths[-1] += -total % multiple  # a multiple of 2 * cp_size too, as `multiple` is
    cu_pad = torch.zeros_like(cu)
    cu_pad[1:] = padded_lengths.cumsum(0)
    total = int(cu_pad[-1])
    where = padded_token_index(cu, cu_pad)  # index in the padded row of every real token

    ids = torch.cat(ids_per_sample)
    input_ids = ids.new_full((total,), pad_token_id).index_copy_(0, where, ids)
    # next-token targets inside each sequence; a sequence's last token predicts nothing
    is_last = torch.zeros(ids.numel(), dtype=torch.bool)
    is_last[cu[1:].long() - 1] = True
    targets = torch.cat(
        [
            torch.ones(x.numel(), dtype=torch.bool) if s.target_mask is None else s.target_mask.reshape(-1).bool()
            for x, s in zip(ids_per_sample, samples, strict=True)
        ]
    )
    next_ids = torch.cat([ids[1:], ids.new_zeros(1)]).masked_fill(is_last, 0)
    next_is_target = torch.cat([targets[1:], targets.new_zeros(1)]) & ~is_last
    labels = ids.new_zeros(total).index_copy_(0, where, next_ids)
    loss_mask = torch.zeros(total).index_copy_(0, where, next_is_target.float())

    image_grid_thw = _cat([s.image_grid_thw for s in samples])
    video_grid_thw = _cat([s.video_grid_thw for s in samples])
    second_per_grid_ts = None
    if video_grid_thw is not None and any(s.second_per_grid_ts is not None for s in samples):
        # a video without timing uses 1 second per temporal grid step, transformers' default
        second_per_grid_ts = torch.cat(
            [
                torch.as_tensor(s.second_per_grid_ts, dtype=torch.float32).reshape(-1)
                if s.second_per_grid_ts is not None
                else torch.ones(len(s.video_grid_thw), dtype=torch.float32)
                for s in samples
                if s.video_grid_thw is not None
            ]
        )
    rope_deltas = None
    if config is None:
        real_positions = torch.cat([torch.arange(x.numel()) for x in ids_per_sample]).unsqueeze(0)
    else:
        real_positions, rope_deltas = config.packed_positions(
            ids, cu, image_grid_thw, video_grid_thw, second_per_grid_ts
        )
        real_positions = real_positions[:, 0]
    position_ids = real_positions.new_zeros(real_positions.shape[0], total)
    position_ids.index_copy_(1, where, real_positions)
    position_ids = position_ids.unsqueeze(1) if config is not None else position_ids

    max_len = int(padded_lengths.max())
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_pad,
        cu_seqlens_kv_padded=cu_pad,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )
    return PackedBatch(
        input_ids=input_ids.unsqueeze(0),
        labels=labels.unsqueeze(0),
        loss_mask=loss_mask.unsqueeze(0),
        position_ids=position_ids,
        cu_seqlens=cu,
        cu_seqlens_padded=cu_pad,
        rope_deltas=rope_deltas,
        packed_seq_params=params,
        pixel_values=_cat([s.pixel_values for s in samples]),
        image_grid_thw=image_grid_thw,
        pixel_values_videos=_cat([s.pixel_values_videos for s in samples]),
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
    )
