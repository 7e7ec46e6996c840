"""Qwen2.5-VL on Megatron-Core: the vision tower (first pipeline stage only) feeding a GPT
language model with M-RoPE.

    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)   # see provider.py
    loss = model(input_ids, position_ids, labels=labels, pixel_values=pv, image_grid_thw=thw)

Vision embeddings replace the image / video placeholder tokens in the token embeddings on the
full sequence, before the sequence-parallel scatter and before any context-parallel split,
so every rank's slice already holds them. Position ids are M-RoPE's [3, batch, seq] from
`rope_index` (plain [batch, seq] for a text-only Qwen2 model).

Context parallelism (CP > 1) takes packed THD rows only, given WHOLE on every CP rank: input_ids
and labels [1, T], position_ids [3, 1, T], T the padded row of `data.packing.pack_sequences(...,
cp_size=cp)` (every sequence padded to a multiple of 2 * cp; with SP also pad_to_multiple_of=
2 * cp * tp, so each rank's T / cp tokens divide over TP). The model
embeds and scatters the vision embeddings on the full row, keeps this rank's tokens
(`cp_token_indices`: chunks r and 2cp-1-r of every sequence), and the rope picks the same rows
from full-row frequencies (`packed_attention.FullRowMRoPE`). Outputs (per-token loss, logits)
cover this rank's tokens only, in `cp_token_indices` order: split loss_mask etc. with
`split_for_context_parallel`. Each image goes through the vision tower on one CP rank only
(`_vision_embeddings`). Attention under CP: Transformer Engine's THD attention (p2p) on GPU, our
exact all-gather attention on the local spec (`packed_attention.PackedCausalAttention`).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.models.qwen25_vl.packed_attention import (
    FullRowMRoPE,
    check_packed_mrope,
    segment_bounds,
)
from megatron_revisual.models.qwen25_vl.vision import Qwen25VisionModel
from megatron_revisual.parallel.context_parallel import cp_rank_indices


def cp_token_indices(packed_seq_params: PackedSeqParams) -> Tensor:
    """Indices in the full padded packed row of the tokens this CP rank holds, in the order of
    the model's outputs (all of them when CP is 1)."""
    return cp_rank_indices(
        segment_bounds(packed_seq_params),
        parallel_state.get_context_parallel_world_size(),
        parallel_state.get_context_parallel_rank(),
    )


def split_for_context_parallel(
    tensor: Tensor, packed_seq_params: PackedSeqParams, seq_dim: int = 1
) -> Tensor:
    """This CP rank's tokens of a full packed-row tensor (labels, loss_mask, advantages ...)
    along `seq_dim`, matching the model's per-token outputs; identity when CP is 1."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return tensor
    index = cp_token_indices(packed_seq_params)
    dim = seq_dim % tensor.dim()
    if tensor.shape[dim] != segment_bounds(packed_seq_params)[-1]:
        raise ValueError(
            f"expected the full packed row ({segment_bounds(packed_seq_params)[-1]} tokens) on dim "
            f"{seq_dim}, got shape {tuple(tensor.shape)}"
        )
    return tensor.index_select(dim, index.to(tensor.device))


def _deal_runs(sizes: list[int], parts: int) -> list[int]:
    """Boundaries [0, ..., len(sizes)] cutting `sizes` into `parts` contiguous runs: run r ends at
    the first item whose running total reaches (r + 1) / parts of the whole (runs may be empty)."""
    total, running, bounds = sum(sizes), 0, [0]
    for i, size in enumerate(sizes):
        running += size
        while len(bounds) < parts and running * parts >= total * len(bounds):
            bounds.append(i + 1)
    bounds += [len(sizes)] * (parts + 1 - len(bounds))
    return bounds


class Qwen25VLModel(MegatronModule):
    """One pipeline stage (or the whole model) of Qwen2.5-VL.

    Parameter names: `vision_model.*` (first stage) and `language_model.*` (Megatron GPTModel);
    `convert.mapping.qwen25_vl_rules` maps them to Hugging Face names.
    """

    def __init__(
        self,
        *,
        language_config: TransformerConfig,
        language_spec: ModuleSpec,
        vision_config: TransformerConfig | None,
        model: ModelConfig,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ) -> None:
        super().__init__(config=language_config)
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        self.model_cfg = model
        self.pre_process = pre_process
        self.post_process = post_process
        self.vision_model = None
        if model.vision is not None and pre_process:
            if vision_config is None:
                raise ValueError("a vision model config is required on the first pipeline stage")
            self.vision_model = Qwen25VisionModel(vision_config, model.vision, model.hidden_size)
        self.language_model = GPTModel(
            config=language_config,
            transformer_layer_spec=language_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="mrope" if model.vision is not None else "rope",
            rotary_base=int(model.rotary_base),
            # We scatter to the sequence-parallel region ourselves, after the vision scatter.
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        if language_config.context_parallel_size > 1 and model.vision is not None:
            # Full-row M-RoPE frequencies: Megatron's THD rope picks each CP rank's rows itself.
            self.language_model.rotary_pos_emb = FullRowMRoPE(self.language_model.rotary_pos_emb)
        # Read by Megatron's finalize_model_grads to all-reduce tied embedding grads across PP.
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights
        # Set by train.builders.wrap_ddp under overlapped gradient reduction: a training forward
        # without images runs the vision tower on a blank image and adds 0 x its output, so every
        # trainable parameter gets a gradient in every micro-batch. Megatron launches a bucket's
        # reduction when all its parameters have one; a DP rank whose micro-batch had no image
        # would otherwise launch its buckets in another order than its peers (a collective
        # mismatch under gloo, a hang under NCCL).
        self.idle_vision_pass = False

    def shared_embedding_or_output_weight(self) -> Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor]) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def embed(
        self,
        input_ids: Tensor,
        *,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
    ) -> Tensor:
        """Token embeddings [seq, batch, hidden] (full sequence, replicated over TP) with the
        vision embeddings scattered into the placeholder positions."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        media = [
            ("image", self.model_cfg.image_token_id, pixel_values, image_grid_thw),
            ("video", self.model_cfg.video_token_id, pixel_values_videos, video_grid_thw),
        ]
        if (self.idle_vision_pass and self.vision_model is not None and torch.is_grad_enabled()
                and pixel_values is None and pixel_values_videos is None):
            embeddings = embeddings + 0.0 * self._blank_image_embeddings(embeddings).sum()
        for kind, token_id, pixels, grid in media:
            mask = input_ids == token_id
            count = int(mask.sum())
            if pixels is None:
                if count:
                    raise ValueError(
                        f"input_ids hold {count} {kind} placeholder tokens (id {token_id}) but no "
                        f"{'pixel_values' if kind == 'image' else 'pixel_values_videos'} were given"
                    )
                continue
            if self.vision_model is None:
                raise ValueError(f"{kind} inputs given to a model without a vision tower")
            vision = self._vision_embeddings(pixels, grid).to(embeddings.dtype)
            if vision.shape[0] != count:
                raise ValueError(
                    f"input_ids hold {count} {kind} placeholder tokens (id {token_id}) but the vision "
                    f"tower produced {vision.shape[0]} {kind} embeddings for grid_thw {grid.tolist()}"
                )
            # [s, b, h] -> row-major (b, s) order, the order the processor laid the tokens out in.
            embeddings = embeddings.transpose(0, 1)
            embeddings = embeddings.masked_scatter(mask.unsqueeze(-1), vision).transpose(0, 1)
        return embeddings.contiguous()

    def _vision_embeddings(self, pixels: Tensor, grid: Tensor) -> Tensor:
        """The vision tower's embeddings of all images (or videos) of the row, [tokens, hidden].

        Under CP each image is encoded once, not on every CP rank: the images are dealt to the CP
        ranks in contiguous runs of about equal patch counts, each rank encodes its run, and the
        embeddings are all-gathered (zero-padded to the longest run) before the scatter into the
        full row. The gather's backward sums every rank's gradient (each rank's tokens use other
        ranks' images). A rank dealt no image encodes one blank merge unit and keeps none of it,
        so its vision tower still takes part in the backward."""
        cp = parallel_state.get_context_parallel_world_size()
        if cp == 1:
            return self.vision_model(pixels, grid)
        from megatron_revisual.parallel.context_parallel import all_gather_cp

        rank = parallel_state.get_context_parallel_rank()
        merge = self.model_cfg.vision.spatial_merge_size ** 2
        patches = grid.prod(-1).tolist()
        bounds = _deal_runs(patches, cp)  # image runs [bounds[r], bounds[r + 1])
        first, last = bounds[rank], bounds[rank + 1]
        if last > first:
            start = sum(patches[:first])
            mine = self.vision_model(pixels[start:start + sum(patches[first:last])], grid[first:last])
        else:
            mine = self._blank_image_embeddings(pixels)[:0]
        counts = [sum(patches[bounds[r]:bounds[r + 1]]) // merge for r in range(cp)]
        longest = max(counts)
        padded = torch.cat([mine, mine.new_zeros(longest - mine.shape[0], mine.shape[1])])
        every = all_gather_cp(padded, parallel_state.get_context_parallel_group(), replicated=False)
        return torch.cat([every[r * longest:r * longest + n] for r, n in enumerate(counts)])

    def _blank_image_embeddings(self, like: Tensor) -> Tensor:
        """The vision tower's output for one black image of one merge unit (merge^2 patches)."""
        v = self.model_cfg.vision
        m = v.spatial_merge_size
        width = v.in_channels * v.temporal_patch_size * v.patch_size**2
        pixels = torch.zeros(m * m, width, dtype=like.dtype, device=like.device)
        grid = torch.tensor([[1, m, m]], dtype=torch.long, device=like.device)
        return self.vision_model(pixels, grid)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """Per-token loss [batch, seq] when `labels` are given, else logits [batch, seq, vocab/TP]
        (last stage), or this stage's hidden states (other stages).

        Packed rows (batch 1, `packed_seq_params.qkv_format="thd"`, see data.packing) take
        position_ids [3, 1, T] covering the padded row, so Megatron applies M-RoPE per token.
        Under CP the inputs are the full row and the outputs this rank's tokens (module doc)."""
        check_packed_mrope(self.config, position_ids, packed_seq_params)
        cp = self.config.context_parallel_size > 1
        if cp and (packed_seq_params is None or packed_seq_params.qkv_format != "thd"):
            raise NotImplementedError(
                "context parallelism takes packed THD rows (data.packing.pack_sequences(cp_size=...))"
            )
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(
                input_ids,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw,
            )
            if cp:  # after the vision scatter, before the SP scatter
                decoder_input = split_for_context_parallel(decoder_input, packed_seq_params, seq_dim=0)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        if cp:
            # Position ids stay whole: FullRowMRoPE needs every token's frequencies.
            if input_ids is not None:
                input_ids = split_for_context_parallel(input_ids, packed_seq_params)
            if labels is not None:
                labels = split_for_context_parallel(labels, packed_seq_params)
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
        )
