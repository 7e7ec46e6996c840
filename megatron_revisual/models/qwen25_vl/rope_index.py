"""Qwen2.5-VL multimodal rotary (M-RoPE) position ids: three axes (temporal, height, width).

The rule, read from transformers 5.19 `Qwen2_5_VLModel.get_rope_index` (our reference, checked
token for token by tests/unit/test_rope_index.py):

- Only attended tokens (attention_mask == 1) get positions; they are numbered as if the
  padding were not there. Masked tokens get position 0 on all three axes.
- A text token takes the running position `p` on all three axes, then `p += 1`.
- An image or video with patch grid (t, h, w) and spatial merge `m` fills t * (h/m) * (w/m)
  placeholder tokens, in (t, h, w) row-major order, with positions
      temporal = p + int(frame * interval),  height = p + row,  width = p + col
  where `interval` is 1 for images and `tokens_per_second * second_per_grid_t` for videos
  (second_per_grid_t defaults to 1). The product is taken in the dtype of
  `second_per_grid_ts` (float32 from the processor) and truncated toward zero.
  Afterwards `p += max(h, w) // m` -- NOT "largest position so far + 1": for a video whose
  scaled temporal positions run past the spatial extent, text resumes below them (transformers
  5.19 behaviour; vLLM 0.32's `Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions`
  resumes at the largest position + 1 instead, so the two differ after such videos).
- Images and videos are consumed in order across the whole batch (or packed row).
- rope_delta of a row = (largest position + 1) - (number of attended tokens). Generation
  continues with position `text_position + rope_delta` on all three axes, see
  `decode_position_ids`.

Pure torch: nothing from transformers is imported here, so rollouts and training share it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

_TEXT, _IMAGE, _VIDEO = 0, 1, 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class MRopeIndexConfig:
    """The few model constants the rope index depends on (values of the released checkpoints)."""

    image_token_id: int = 151655
    video_token_id: int = 151656
    spatial_merge_size: int = 2
    tokens_per_second: int | float = 2

    @classmethod
    def from_hf_config(cls, config: Any) -> MRopeIndexConfig:
        """From a `Qwen2_5_VLConfig` (duck-typed, so transformers need not be imported)."""
        vision = config.vision_config
        return cls(
            image_token_id=int(config.image_token_id),
            video_token_id=int(config.video_token_id),
            spatial_merge_size=int(vision.spatial_merge_size),
            tokens_per_second=vision.tokens_per_second,
        )

    def packed_positions(
        self, input_ids: torch.Tensor, cu_seqlens: Any, image_grid_thw: Any = None, video_grid_thw: Any = None,
        second_per_grid_ts: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`packed_rope_index` with these constants (what `data.packing` calls)."""
        return packed_rope_index(input_ids, cu_seqlens, image_grid_thw, video_grid_thw, second_per_grid_ts, config=self)


def mrope_config(model_cfg: Any) -> MRopeIndexConfig | None:
    """The rope-index constants of a run's `ModelConfig` (duck-typed); None for a text-only
    model, whose rope is plain."""
    if model_cfg.vision is None:
        return None
    return MRopeIndexConfig(
        image_token_id=model_cfg.image_token_id,
        video_token_id=model_cfg.video_token_id,
        spatial_merge_size=model_cfg.vision.spatial_merge_size,
        tokens_per_second=model_cfg.vision.tokens_per_second,
    )


class _VisionQueue:
    """Hands out the images and videos of a batch in order, with their temporal interval."""

    def __init__(
        self,
        config: MRopeIndexConfig,
        image_grid_thw: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None,
        second_per_grid_ts: torch.Tensor | Sequence[float] | None,
    ) -> None:
        self.config = config
        self.grids = {
            _IMAGE: [] if image_grid_thw is None else image_grid_thw.tolist(),
            _VIDEO: [] if video_grid_thw is None else video_grid_thw.tolist(),
        }
        n_videos = len(self.grids[_VIDEO])
        if second_per_grid_ts is not None and len(second_per_grid_ts) < n_videos:
            raise ValueError(
                f"second_per_grid_ts has {len(second_per_grid_ts)} entries for {n_videos} videos"
            )
        self.second_per_grid_ts = second_per_grid_ts
        self.next = {_IMAGE: 0, _VIDEO: 0}

    def tokens_per_item(self, kind: int) -> list[int]:
        m = self.config.spatial_merge_size
        return [t * (h // m) * (w // m) for t, h, w in self.grids[kind]]

    def pop(self, kind: int) -> tuple[list[int], int | float | torch.Tensor]:
        i = self.next[kind]
        name = "image" if kind == _IMAGE else "video"
        if i >= len(self.grids[kind]):
            raise ValueError(
                f"more {name}s in input_ids than the {len(self.grids[kind])} in {name}_grid_thw"
            )
        self.next[kind] = i + 1
        if kind == _IMAGE:
            return self.grids[kind][i], 1
        # Keep the element's own type (0-d tensor or Python number): the product's dtype, and so
        # the truncation of e.g. 2 * 0.7 frames, must be the one transformers computes.
        seconds = 1 if self.second_per_grid_ts is None else self.second_per_grid_ts[i]
        return self.grids[kind][i], self.config.tokens_per_second * seconds


def _vision_block(
    start: int,
    grid: list[int],
    interval: int | float | torch.Tensor,
    merge: int,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Positions [3, t*h'*w'] of one image/video starting at `start`, and how far `p` advances."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    temporal = (torch.arange(t, device=device) * interval).long() + start
    rows = torch.arange(h, device=device) + start
    cols = torch.arange(w, device=device) + start
    block = torch.stack(
        [
            temporal.view(t, 1, 1).expand(t, h, w),
            rows.view(1, h, 1).expand(t, h, w),
            cols.view(1, 1, w).expand(t, h, w),
        ]
    ).reshape(3, -1)
    return block, max(grid[1], grid[2]) // merge


def _sequence_positions(
    ids: torch.Tensor, queue: _VisionQueue, where: str
) -> tuple[torch.Tensor, int]:
    """Positions [3, n] (int64) of one unpadded sequence and its rope delta."""
    cfg = queue.config
    n = ids.numel()
    if n == 0:
        return torch.zeros(3, 0, dtype=torch.long, device=ids.device), 0
    kinds = torch.zeros_like(ids)
    kinds[ids == cfg.image_token_id] = _IMAGE
    kinds[ids == cfg.video_token_id] = _VIDEO
    # Runs of equal kind; a vision run may hold several back-to-back images, each consuming
    # exactly its own token count (transformers assumes one item per run).
    boundaries = [0, *((kinds[1:] != kinds[:-1]).nonzero().flatten() + 1).tolist(), n]
    pieces, pos = [], 0
    for start, end in zip(boundaries[:-1], boundaries[1:], strict=True):
        kind = int(kinds[start])
        if kind == _TEXT:
            pieces.append((torch.arange(end - start, device=ids.device) + pos).expand(3, -1))
            pos += end - start
            continue
        left = end - start
        while left > 0:
            grid, interval = queue.pop(kind)
            block, advance = _vision_block(pos, grid, interval, cfg.spatial_merge_size, ids.device)
            if block.shape[1] > left:
                name = "image" if kind == _IMAGE else "video"
                raise ValueError(
                    f"{where}: a run of {end - start} {name} placeholder tokens at {start}..{end - 1} "
                    f"does not split into whole {name}s (next grid {grid} needs {block.shape[1]}, "
                    f"{left} left)"
                )
            pieces.append(block)
            pos += advance
            left -= block.shape[1]
    positions = torch.cat(pieces, dim=1)
    return positions, int(positions.max()) + 1 - n


def _check_placeholder_counts(
    ids: torch.Tensor, queue: _VisionQueue, attended: torch.Tensor | None
) -> None:
    """Fail early, naming both counts, when the placeholders and the grids disagree."""
    cfg = queue.config
    for kind, name, token_id in (
        (_IMAGE, "image", cfg.image_token_id),
        (_VIDEO, "video", cfg.video_token_id),
    ):
        is_placeholder = ids == token_id
        if attended is not None:
            is_placeholder &= attended
        in_ids = int(is_placeholder.sum())
        per_item = queue.tokens_per_item(kind)
        if in_ids != sum(per_item):
            raise ValueError(
                f"input_ids hold {in_ids} {name} placeholder tokens (id {token_id}) but "
                f"{name}_grid_thw describes {sum(per_item)} ({len(per_item)} {name}s of "
                f"{per_item} tokens, spatial_merge_size={cfg.spatial_merge_size})"
            )


def rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    config: MRopeIndexConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of a padded batch, equal to transformers' `get_rope_index`.

    Args:
        input_ids: [batch, seq] token ids, image/video placeholders expanded.
        image_grid_thw: [n_images, 3] patch grids of the batch's images, in order.
        video_grid_thw: [n_videos, 3] patch grids of the batch's videos, in order.
        second_per_grid_ts: [n_videos] seconds per temporal grid step (processor output).
        attention_mask: [batch, seq], 1 for real tokens; any padding side, holes allowed.
        config: token ids, spatial merge size, tokens per second.

    Returns:
        position_ids [3, batch, seq] with input_ids' dtype (0 at masked tokens), and
        rope_deltas [batch, 1] int64 (see `decode_position_ids`).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    attended = None if attention_mask is None else attention_mask.bool()
    queue = _VisionQueue(config, image_grid_thw, video_grid_thw, second_per_grid_ts)
    _check_placeholder_counts(input_ids, queue, attended)

    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    deltas = []
    for row, ids in enumerate(input_ids):
        keep = None if attended is None else attended[row]
        positions, delta = _sequence_positions(
            ids if keep is None else ids[keep], queue, f"row {row}"
        )
        if keep is None:
            position_ids[:, row] = positions.to(input_ids.dtype)
        else:
            position_ids[:, row, keep] = positions.to(input_ids.dtype)
        deltas.append(delta)
    rope_deltas = torch.tensor(deltas, dtype=torch.long, device=input_ids.device).unsqueeze(1)
    return position_ids, rope_deltas


def packed_rope_index(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    *,
    config: MRopeIndexConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of one packed (THD) row holding several sequences.

    Each sequence `input_ids[cu_seqlens[i]:cu_seqlens[i+1]]` is numbered from 0 exactly as if it
    were its own unpadded batch row, so the result equals concatenating per-sequence
    `get_rope_index` results. The grids list the images/videos of all sequences in packing
    order; each sequence consumes its own.

    Args:
        input_ids: [total] or [1, total] packed token ids, no padding between sequences
            (pad for context parallelism after this, see `parallel.context_parallel`).
        cu_seqlens: [n_seqs + 1] sequence boundaries, 0 first and `total` last.

    Returns:
        position_ids [3, 1, total] and rope_deltas [n_seqs, 1] (one per sequence).
    """
    if input_ids.dim() not in (1, 2) or (input_ids.dim() == 2 and input_ids.shape[0] != 1):
        raise ValueError(
            f"packed input_ids must be [total] or [1, total], got {tuple(input_ids.shape)}"
        )
    flat = input_ids.reshape(-1)
    bounds = torch.as_tensor(cu_seqlens).tolist()
    total = flat.numel()
    if (
        len(bounds) < 2
        or bounds[0] != 0
        or bounds[-1] != total
        or any(b > e for b, e in zip(bounds[:-1], bounds[1:], strict=True))
    ):
        raise ValueError(
            f"cu_seqlens={bounds} must start at 0, not decrease and end at the {total} packed tokens"
        )
    queue = _VisionQueue(config, image_grid_thw, video_grid_thw, second_per_grid_ts)
    _check_placeholder_counts(flat, queue, None)
    pieces, deltas = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        positions, delta = _sequence_positions(flat[start:end], queue, f"packed sequence {i}")
        pieces.append(positions)
        deltas.append(delta)
    position_ids = torch.cat(pieces, dim=1).to(input_ids.dtype).unsqueeze(1)
    rope_deltas = torch.tensor(deltas, dtype=torch.long, device=flat.device).unsqueeze(1)
    return position_ids, rope_deltas


def decode_position_ids(
    rope_deltas: torch.Tensor,
    cache_position: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions [3, batch, n] of the n tokens appended after a prompt (generation / decode).

    Text after the prompt has the same position on all three axes: its 1-D position plus the
    row's rope delta, as transformers' Qwen2.5-VL generation does. The 1-D position is
    `cache_position` (index in the KV cache) without a mask, or, with the attention mask of
    prompt + new tokens, the count of attended tokens before it, so that a left-padded row's
    first new token lands at (largest prompt position + 1) like an unpadded one.

    Args:
        rope_deltas: [batch, 1] from `rope_index`.
        cache_position: [n] KV-cache indices of the new tokens (e.g. `tensor([prompt_len])`).
        attention_mask: optional [batch, prompt_len + n_generated_so_far (>= max index + 1)].
    """
    batch = rope_deltas.shape[0]
    if attention_mask is None:
        text = cache_position.view(1, -1).expand(batch, -1)
    else:
        mask = attention_mask.long()
        # Counting attended tokens makes padding invisible; masked slots get 0 as transformers'.
        text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, cache_position]
    return (text + rope_deltas.to(text.device)).unsqueeze(0).expand(3, -1, -1)
