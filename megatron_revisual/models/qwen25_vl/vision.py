"""The Qwen2.5-VL vision tower on Megatron-Core building blocks, tensor-parallel.

    config = vision_transformer_config(cfg.model.vision, cfg.parallel, torch.bfloat16)
    tower = Qwen25VisionModel(config, cfg.model.vision, out_hidden_size=cfg.model.hidden_size)
    embeds = tower(pixel_values, image_grid_thw)   # [merged tokens, LM hidden], input order

Same computation as Hugging Face's `Qwen2_5_VisionTransformerPretrainedModel`:
1. patch embedding: the Conv3d (stride == kernel) as a linear over the processor's flattened
   patches [patches, C*T*P*P];
2. tokens reordered into window order: each window is (window_size / patch / merge)^2 merge
   units of merge^2 patches, windows padded at the right / bottom edge of an image keep only
   their real units; a merge unit stays contiguous, so the merger still sees its patches;
3. `depth` layers with 2D rope (h, w position per patch, theta 10000, head_dim/4 frequencies
   per axis), attention within a window, or within a frame for `fullatt_block_indexes`;
4. merger: RMSNorm -> [units, merge^2 * hidden] -> column-parallel Linear -> GELU ->
   row-parallel Linear to the LM hidden size; then the inverse window permutation.

Tensor parallelism: attention heads, MLP and merger width split over the TP group; the output
is replicated on every TP rank. No sequence parallelism inside the tower (its activations are
small next to the LM's; it runs whole on each rank) and no context parallelism: the LM's SP/CP
split happens after the vision embeddings are scattered into the token embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_revisual.config.schema import ParallelConfig, VisionConfig
from megatron_revisual.models.qwen25_vl.vision_spec import AttentionBackend, vision_layer_spec
from megatron_revisual.parallel.norm import RMSNorm

VISION_ROPE_THETA = 10_000.0
VISION_NORM_EPS = 1e-6


def vision_transformer_config(
    vision: VisionConfig, parallel: ParallelConfig, params_dtype: torch.dtype
) -> TransformerConfig:
    """Megatron `TransformerConfig` of the vision layers (and merger) for this TP size."""
    tp = parallel.tensor_model_parallel_size
    sharded = {
        "num_heads": vision.num_heads,
        "intermediate_size": vision.intermediate_size,
        "merger width (hidden_size * spatial_merge_size^2)": (
            vision.hidden_size * vision.spatial_merge_size**2
        ),
    }
    bad = {name: value for name, value in sharded.items() if value % tp}
    if bad:
        legal = [t for t in range(1, 65) if all(value % t == 0 for value in sharded.values())]
        raise ValueError(
            f"tp={tp} does not divide the vision tower's {bad}; use tp in {legal}"
        )
    if vision.hidden_size % vision.num_heads:
        raise ValueError(
            f"vision hidden_size={vision.hidden_size} is not divisible by num_heads={vision.num_heads}"
        )
    return TransformerConfig(
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads,
        kv_channels=vision.hidden_size // vision.num_heads,
        ffn_hidden_size=vision.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=VISION_NORM_EPS,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        # The tower lives whole on the first pipeline stage; no SP/CP inside it (module doc).
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
    )


def _check_grid(grid_thw: torch.Tensor, spatial_merge_size: int) -> list[tuple[int, int, int]]:
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [images, 3] (t, h, w); got shape {tuple(grid_thw.shape)}")
    grids = [tuple(int(x) for x in row) for row in grid_thw.tolist()]
    if not grids:
        raise ValueError("grid_thw has no images (shape [0, 3]); call the vision tower only with pixels")
    for i, (t, h, w) in enumerate(grids):
        if t < 1 or h % spatial_merge_size or w % spatial_merge_size or h < 1 or w < 1:
            raise ValueError(
                f"grid_thw[{i}] = {[t, h, w]}: t must be >= 1 and h, w positive multiples of "
                f"spatial_merge_size={spatial_merge_size}"
            )
    return grids


def vision_position_ids(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """(h, w) position of every patch, in the processor's patch order: [patches, 2], long.

    The processor emits patches merge unit by merge unit (row-major over units, row-major inside
    a unit), and every frame of a video repeats the image's positions.
    """
    m = spatial_merge_size
    out = []
    for t, h, w in _check_grid(grid_thw, m):
        hpos = torch.arange(h).view(h, 1).expand(h, w)
        wpos = torch.arange(w).view(1, w).expand(h, w)
        per_frame = torch.stack([hpos, wpos], dim=-1)  # [h, w, 2]
        per_frame = per_frame.reshape(h // m, m, w // m, m, 2).permute(0, 2, 1, 3, 4)
        out.append(per_frame.reshape(h * w, 2).repeat(t, 1))
    return torch.cat(out)


def vision_rotary_angles(position_ids: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rope angles per patch, [patches, head_dim], as Megatron's `rotary_pos_emb` expects them
    (rotate-half layout): [h * f, w * f] repeated twice, f = theta^(-4i/head_dim), i < head_dim/4."""
    if head_dim % 4:
        raise ValueError(f"vision head_dim={head_dim} must be divisible by 4 for 2D rope")
    half = head_dim // 2
    inv_freq = 1.0 / (VISION_ROPE_THETA ** (torch.arange(0, half, 2, dtype=torch.float) / half))
    angles = (position_ids.float().unsqueeze(-1) * inv_freq).flatten(1)  # [patches, (h, w) x f]
    return torch.cat([angles, angles], dim=-1)


def vision_window_index(
    grid_thw: torch.Tensor, *, spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The window order of the merge units and the window boundaries.

    Returns `window_index` [units] (long): unit `window_index[j]` of the input goes to place j;
    and `cu_window_seqlens` [windows + 1] (int32), in patches. Windows tile each frame from
    the top-left corner, window_size / patch_size / spatial_merge_size units on a side; windows
    at the right / bottom edge hold only the units that exist (no window is empty).
    """
    m = spatial_merge_size
    side = window_size // m // patch_size
    if side < 1:
        raise ValueError(
            f"window_size={window_size} is smaller than one merge unit "
            f"(patch_size={patch_size} x spatial_merge_size={m})"
        )
    indices, unit_counts = [], []
    offset = 0
    for t, h, w in _check_grid(grid_thw, m):
        uh, uw = h // m, w // m
        nh, nw = -(-uh // side), -(-uw // side)
        units = torch.arange(t * uh * uw).view(t, uh, uw)
        padded = F.pad(units, (0, nw * side - uw, 0, nh * side - uh), value=-1)
        windows = padded.view(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(-1, side * side)
        real = windows >= 0
        indices.append(windows[real] + offset)
        unit_counts.append(real.sum(dim=1))
        offset += t * uh * uw
    seqlens = torch.cat(unit_counts) * (m * m)
    cu_window_seqlens = F.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)
    return torch.cat(indices), cu_window_seqlens


def vision_frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Boundaries of the frames (an image is one frame), in patches: [frames + 1], int32."""
    frames = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    return F.pad(torch.tensor(frames, dtype=torch.int64).cumsum(0), (1, 0)).to(torch.int32)


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """`inv` with inv[index[j]] = j, i.e. x[index][inv] == x."""
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    return inverse


def _segments(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    # sbhd, not thd: see vision_spec's module doc
    return PackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


class VisionTransformerBlock(TransformerBlock):
    """Megatron's `TransformerBlock` whose layers each attend within their own segments:
    windows, or whole frames for the layers listed in `fullatt_block_indexes` (0-based)."""

    def __init__(
        self,
        config: TransformerConfig,
        spec: TransformerBlockSubmodules,
        fullatt_block_indexes: list[int],
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        bad = [i for i in fullatt_block_indexes if not 0 <= i < config.num_layers]
        if bad:
            raise ValueError(
                f"fullatt_block_indexes {bad} outside range(depth={config.num_layers})"
            )
        if config.recompute_granularity is not None:
            raise NotImplementedError("activation recompute is not wired into the vision tower")
        super().__init__(
            config, spec, post_layer_norm=False, pre_process=True, post_process=True,
            pg_collection=pg_collection,
        )
        self.fullatt_block_indexes = frozenset(fullatt_block_indexes)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        rotary_pos_emb: torch.Tensor,
        window_segments: PackedSeqParams,
        frame_segments: PackedSeqParams,
    ) -> torch.Tensor:
        """hidden_states [patches, 1, hidden] in window order -> same shape."""
        for layer in self.layers:
            full = layer.layer_number - 1 in self.fullatt_block_indexes  # layer_number: 1-based
            hidden_states, _ = layer(
                hidden_states=hidden_states,
                attention_mask=None,
                rotary_pos_emb=rotary_pos_emb,
                packed_seq_params=frame_segments if full else window_segments,
            )
        return hidden_states


class PatchMerger(MegatronModule):
    """RMSNorm, then each merge unit's patches concatenated and projected by a column-parallel
    Linear -> GELU -> row-parallel Linear; output replicated on the TP ranks."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        spatial_merge_size: int,
        out_hidden_size: int,
        tp_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__(config=config)
        self.merged_width = config.hidden_size * spatial_merge_size**2
        self.norm = RMSNorm(config, config.hidden_size, eps=VISION_NORM_EPS)
        self.linear_fc1 = ColumnParallelLinear(
            self.merged_width,
            self.merged_width,
            config=config,
            init_method=config.init_method,
            bias=True,
            gather_output=False,
            skip_bias_add=False,
            tp_group=tp_group,
        )
        self.linear_fc2 = RowParallelLinear(
            self.merged_width,
            out_hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[patches, hidden] (merge units contiguous) -> [units, out_hidden]."""
        x = self.norm(hidden_states).reshape(-1, self.merged_width)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))
        return x


class Qwen25VisionModel(MegatronModule):
    """Pixels of one or more images / videos -> their vision embeddings for the LM.

    Parameter names (`vision_model.` prefix in the full model) match `convert.mapping`:
    `patch_embed.weight`, `decoder.layers.{i}.{input_layernorm, self_attention.linear_qkv,
    self_attention.linear_proj, pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}`,
    `merger.{norm, linear_fc1, linear_fc2}`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        vision: VisionConfig,
        out_hidden_size: int,
        *,
        backend: AttentionBackend = "local",
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if (config.num_layers, config.hidden_size, config.num_attention_heads) != (
            vision.depth, vision.hidden_size, vision.num_heads,
        ):
            raise ValueError(
                f"config (layers {config.num_layers}, hidden {config.hidden_size}, heads "
                f"{config.num_attention_heads}) does not match VisionConfig (depth {vision.depth}, "
                f"hidden {vision.hidden_size}, heads {vision.num_heads}); build it with "
                "vision_transformer_config"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.vision = vision
        self.patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        self.merge_unit = vision.spatial_merge_size**2
        # Replicated; named `weight` so that `patch_embed.weight` is the Conv3d kernel flattened.
        self.patch_embed = torch.nn.Linear(
            self.patch_dim, vision.hidden_size, bias=False, dtype=config.params_dtype,
            device="cpu" if config.use_cpu_initialization else torch.cuda.current_device(),
        )
        if config.perform_initialization:
            config.init_method(self.patch_embed.weight)
        block = TransformerBlockSubmodules(
            layer_specs=[vision_layer_spec(backend)] * vision.depth, layer_norm=None
        )
        self.decoder = VisionTransformerBlock(
            config, block, list(vision.fullatt_block_indexes), pg_collection=pg_collection
        )
        self.merger = PatchMerger(
            config,
            spatial_merge_size=vision.spatial_merge_size,
            out_hidden_size=out_hidden_size,
            tp_group=pg_collection.tp,
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [patches, C*T*P*P] as the HF processor makes them; grid_thw [images, 3].

        Returns [patches / merge^2, out_hidden], images in input order, each image's tokens in
        the processor's order (the order of its placeholder tokens).
        """
        v = self.vision
        grid_thw = grid_thw.detach().cpu()
        patches = sum(t * h * w for t, h, w in _check_grid(grid_thw, v.spatial_merge_size))
        if pixel_values.dim() != 2 or pixel_values.shape != (patches, self.patch_dim):
            raise ValueError(
                f"pixel_values shape {tuple(pixel_values.shape)}; grid_thw {grid_thw.tolist()} "
                f"needs ({patches}, {self.patch_dim}) = (sum t*h*w, C*T*P*P)"
            )
        device = pixel_values.device
        window_index, cu_window = vision_window_index(
            grid_thw,
            spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size,
            patch_size=v.patch_size,
        )
        positions = vision_position_ids(grid_thw, v.spatial_merge_size)
        angles = vision_rotary_angles(positions, self.config.kv_channels)

        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        x = self._to_window_order(x, window_index.to(device))
        angles = self._to_window_order(angles.to(device), window_index.to(device))
        x = self.decoder(
            x.unsqueeze(1),
            rotary_pos_emb=angles[:, None, None, :],
            window_segments=_segments(cu_window.to(device)),
            frame_segments=_segments(vision_frame_cu_seqlens(grid_thw).to(device)),
        )
        merged = self.merger(x.squeeze(1))
        return merged[inverse_permutation(window_index).to(device)]

    def _to_window_order(self, x: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        units = x.reshape(-1, self.merge_unit, x.shape[-1])
        return units[window_index].reshape(x.shape)
