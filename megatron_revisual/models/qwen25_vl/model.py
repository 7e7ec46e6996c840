"""Qwen2.5-VL on Megatron-Core: the vision tower (first pipeline stage only) feeding a GPT
language model with M-RoPE.

    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)   # see provider.py
    loss = model(input_ids, position_ids, labels=labels, pixel_values=pv, image_grid_thw=thw)

Vision embeddings replace the image / video placeholder tokens in the token embeddings on the
full sequence, before the sequence-parallel scatter and before any context-parallel split,
so every rank's slice already holds them. Position ids are M-RoPE's [3, batch, seq] from
`rope_index` (plain [batch, seq] for a text-only Qwen2 model).
"""

from __future__ import annotations

from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.models.qwen25_vl.packed_attention import check_packed_mrope
from megatron_revisual.models.qwen25_vl.vision import Qwen25VisionModel


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
        # Read by Megatron's finalize_model_grads to all-reduce tied embedding grads across PP.
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights

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
            vision = self.vision_model(pixels, grid).to(embeddings.dtype)
            if vision.shape[0] != count:
                raise ValueError(
                    f"input_ids hold {count} {kind} placeholder tokens (id {token_id}) but the vision "
                    f"tower produced {vision.shape[0]} {kind} embeddings for grid_thw {grid.tolist()}"
                )
            # [s, b, h] -> row-major (b, s) order, the order the processor laid the tokens out in.
            embeddings = embeddings.transpose(0, 1)
            embeddings = embeddings.masked_scatter(mask.unsqueeze(-1), vision).transpose(0, 1)
        return embeddings.contiguous()

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
        position_ids [3, 1, T] covering the padded row, so Megatron applies M-RoPE per token."""
        check_packed_mrope(self.config, position_ids, packed_seq_params)
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(
                input_ids,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw,
            )
            if self.config.context_parallel_size > 1:
                raise NotImplementedError(
                    "context parallelism runs through Transformer Engine's THD attention (GPU); "
                    "split inputs with megatron_revisual.parallel.context_parallel"
                )
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
        )
