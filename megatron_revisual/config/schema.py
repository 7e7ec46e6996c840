"""Typed run configuration.

Every knob a run has lives in one of these dataclasses. Field names follow Megatron-Core's
(`tensor_model_parallel_size`, `num_query_groups`, ...) so a value maps onto
`TransformerConfig` without a translation table. Cross-field checks live in `validate.py`
and run before any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Dtype = Literal["fp32", "bf16", "fp16"]


@dataclass(kw_only=True)
class VisionConfig:
    """Qwen2.5-VL vision tower. Defaults are the released 3B/7B values."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    in_channels: int = 3
    tokens_per_second: int = 2  # video frames' temporal positions per second (M-RoPE)


@dataclass(kw_only=True)
class ModelConfig:
    """The language model (Megatron names) plus an optional vision tower.

    `name` says where the sizes came from (a preset, or `hf` when read from `hf_path`).
    `vision: null` in YAML means a text-only (Qwen2) model.
    """

    name: str = "custom"
    hf_path: str | None = None
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    kv_channels: int | None = None  # head_dim; None means hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    rotary_base: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 128_000
    layernorm_epsilon: float = 1e-6
    add_qkv_bias: bool = True
    params_dtype: Dtype = "bf16"
    # Placeholder token ids the processor puts where vision embeddings go (Qwen's released ids).
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision: VisionConfig | None = None
    # Language-model layer modules: `auto` is Transformer Engine when a GPU and TE are present,
    # else the local (plain torch) spec; see `models.qwen25_vl.provider.layer_backend`.
    layer_backend: Literal["auto", "local", "transformer_engine"] = "auto"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass(kw_only=True)
class PrecisionConfig:
    """FP8 (through Transformer Engine) for the language model's transformer layers only.

    The vision tower, the merger, the embedding and the output layer stay in `model.params_dtype`
    (bf16). Field names and defaults are Megatron-Core's `TransformerConfig` ones, so each maps
    onto the language `TransformerConfig` unchanged (TE's own DelayedScaling defaults differ:
    amax history 1024, algo `max`; set them here if wanted).
    """

    fp8: Literal["e4m3", "hybrid"] | None = None  # hybrid: e4m3 forward, e5m2 gradients
    # delayed: amax history; tensorwise: per-tensor current scaling; mxfp8: Blackwell only;
    # blockwise: 1x128 / 128x128 block scaling.
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1  # delayed recipe only
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"  # delayed recipe only
    fp8_wgrad: bool = True  # false: weight gradients in bf16
    fp8_param: bool = False  # keep GEMM weights in fp8 (TE decides which)
    # Keep the first / last N language layers in bf16 (not with the delayed recipe).
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    virtual_pipeline_model_parallel_size: int | None = None
    # A smaller first stage leaves room for the vision tower, which lives on stage 0.
    num_layers_in_first_pipeline_stage: int | None = None
    use_distributed_optimizer: bool = True


@dataclass(kw_only=True)
class ClusterConfig:
    """Where the run goes: the world is nodes x devices_per_node ranks."""

    nodes: int = 1
    devices_per_node: int = 1
    backend: Literal["auto", "nccl", "gloo"] = "auto"

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass(kw_only=True)
class OptimConfig:
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"


@dataclass(kw_only=True)
class TrainConfig:
    seed: int = 1234
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 128
    train_iters: int = 100


@dataclass(kw_only=True)
class RunConfig:
    """A complete run: what `revisual` commands and launchers are given."""

    name: str = "run"
    output_dir: str = "runs/default"
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    @property
    def model_parallel_size(self) -> int:
        p = self.parallel
        return (
            p.tensor_model_parallel_size
            * p.pipeline_model_parallel_size
            * p.context_parallel_size
        )

    @property
    def data_parallel_size(self) -> int:
        return self.cluster.world_size // self.model_parallel_size
