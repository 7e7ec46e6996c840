"""Cross-field checks of a `RunConfig`, run before any process group starts.

Each failed check names the numbers involved and, where there is a finite set, the legal
values: "parallel.tensor_model_parallel_size=4 does not divide model.num_query_groups=2; use one of [1, 2]".
All failures are collected and reported together. Settings that are legal but defeat their
purpose (PAD that cannot prioritise) are `ConfigWarning`s (`config_warnings`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal

from megatron_revisual.config.schema import (
    OptimConfig,
    PADConfig,
    PrecisionConfig,
    RLConfig,
    RunConfig,
)

LayerBackend = Literal["local", "transformer_engine"]
FP8_FORMATS = ["e4m3", "hybrid"]
FP8_RECIPES_WITH_BF16_EDGES = ["tensorwise", "mxfp8", "blockwise"]


class ConfigValidationError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


def divisors(n: int, limit: int = 64) -> list[int]:
    """Divisors of n up to `limit` (no parallel size beyond 64 is practical)."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def validate_config(cfg: RunConfig) -> None:
    """Raise ConfigValidationError listing every problem found."""
    problems: list[str] = []
    m, p, c, o, t = cfg.model, cfg.parallel, cfg.cluster, cfg.optim, cfg.train
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size

    def positive(where: str, value: int | float | None) -> bool:
        if value is not None and value <= 0:
            problems.append(f"{where}={value} must be > 0")
            return False
        return True

    ok = all(
        [
            positive("parallel.tensor_model_parallel_size", tp),
            positive("parallel.pipeline_model_parallel_size", pp),
            positive("parallel.context_parallel_size", cp),
            positive("cluster.nodes", c.nodes),
            positive("cluster.devices_per_node", c.devices_per_node),
            positive("model.num_layers", m.num_layers),
            positive("model.num_attention_heads", m.num_attention_heads),
            positive("model.num_query_groups", m.num_query_groups),
            positive("model.hidden_size", m.hidden_size),
            positive("train.micro_batch_size", t.micro_batch_size),
            positive("train.global_batch_size", t.global_batch_size),
            positive("train.seq_length", t.seq_length),
        ]
    )
    positive("optim.lr", o.lr)
    positive("train.train_iters", t.train_iters)
    if cfg.rehearsal.fp8_amax_stand_in and not cfg.rehearsal.collective_checks:
        problems.append("rehearsal.fp8_amax_stand_in=true needs rehearsal.collective_checks=true")
    positive("rehearsal.collective_timeout_s", cfg.rehearsal.collective_timeout_s)
    if not 0 <= c.peer_timeout_s < 3600:
        problems.append(f"cluster.peer_timeout_s={c.peer_timeout_s} must be in [0, 3600) seconds (0 turns the "
                        "heartbeat off; at 3600 the process group's own timeout comes first)")
    from megatron_revisual.models.registry import known_families

    if m.family not in known_families():
        problems.append(f"model.family={m.family!r} is not a registered model family; use one of {known_families()}")
    if not ok:  # the checks below divide by these
        raise ConfigValidationError(problems)

    # Attention heads and KV groups are split across TP ranks.
    if m.num_attention_heads % m.num_query_groups:
        problems.append(
            f"model.num_query_groups={m.num_query_groups} does not divide "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_query_groups % tp:
        problems.append(
            f"parallel.tensor_model_parallel_size={tp} does not divide model.num_query_groups="
            f"{m.num_query_groups}; use one of {divisors(m.num_query_groups)}"
        )
    elif m.num_attention_heads % tp:
        problems.append(
            f"parallel.tensor_model_parallel_size={tp} does not divide model.num_attention_heads="
            f"{m.num_attention_heads}; use one of {divisors(m.num_attention_heads)}"
        )
    if m.ffn_hidden_size % tp:
        problems.append(
            f"parallel.tensor_model_parallel_size={tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}"
        )
    if m.vision is not None:
        v = m.vision
        if v.hidden_size % v.num_heads:
            problems.append(
                f"model.vision.num_heads={v.num_heads} does not divide model.vision.hidden_size={v.hidden_size}"
            )
        elif v.num_heads % tp:
            problems.append(
                f"parallel.tensor_model_parallel_size={tp} does not divide model.vision.num_heads="
                f"{v.num_heads}; use one of {divisors(v.num_heads)}"
            )
        if v.intermediate_size % tp:
            problems.append(
                f"parallel.tensor_model_parallel_size={tp} does not divide model.vision.intermediate_size="
                f"{v.intermediate_size}; use one of {divisors(v.intermediate_size)}"
            )
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            problems.append(
                f"model.vision.fullatt_block_indexes={v.fullatt_block_indexes}: {bad} outside [0, {v.depth})"
            )
    # M-RoPE applies only with a vision tower; a text-only Qwen2 uses plain rope.
    if m.vision is not None and (m.head_dim % 2 or 2 * sum(m.mrope_section) != m.head_dim):
        problems.append(
            f"model.mrope_section={m.mrope_section} must sum to head_dim/2={m.head_dim // 2} "
            f"(head_dim={m.head_dim})"
        )

    # Pipeline: layers split into stages, optionally with a smaller first stage.
    first = p.num_layers_in_first_pipeline_stage
    if first is not None:
        if pp == 1:
            problems.append("parallel.num_layers_in_first_pipeline_stage is set but pipeline_model_parallel_size=1")
        elif not 0 < first < m.num_layers or (m.num_layers - first) % (pp - 1):
            problems.append(
                f"parallel.num_layers_in_first_pipeline_stage={first}: the remaining "
                f"{m.num_layers - first} of model.num_layers={m.num_layers} must split evenly over "
                f"{pp - 1} later stages"
            )
    elif m.num_layers % pp:
        problems.append(
            f"parallel.pipeline_model_parallel_size={pp} does not divide model.num_layers={m.num_layers}; "
            f"use one of {divisors(m.num_layers)} or set parallel.num_layers_in_first_pipeline_stage"
        )
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None:
        if pp == 1:
            problems.append("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1")
        elif first is None and m.num_layers % (pp * vpp):
            problems.append(
                f"model.num_layers={m.num_layers} is not divisible by pipeline ({pp}) x virtual ({vpp}) stages"
            )

    if p.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
    if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
        problems.append("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true "
                        "and parallel.overlap_grad_reduce=true")
    if p.ddp_bucket_size is not None and p.ddp_bucket_size < 1:
        problems.append(f"parallel.ddp_bucket_size={p.ddp_bucket_size}: expected a number of parameters >= 1")
    if cp > 1 and t.seq_length % (2 * cp):
        problems.append(
            f"train.seq_length={t.seq_length} must be divisible by 2 x context_parallel_size={2 * cp} "
            f"(load-balanced CP split)"
        )

    # World layout and batch sizes.
    world = c.world_size
    mp = tp * pp * cp
    if world % mp:
        problems.append(
            f"world size {world} (cluster.nodes={c.nodes} x cluster.devices_per_node={c.devices_per_node}) "
            f"is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {mp}"
        )
    else:
        dp = world // mp
        if t.global_batch_size % (t.micro_batch_size * dp):
            problems.append(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}"
            )

    if t.recompute_granularity == "full":
        if t.recompute_method is None or not t.recompute_num_layers or t.recompute_num_layers < 1:
            problems.append(
                "train.recompute_granularity='full' needs train.recompute_method ('uniform' or 'block') "
                f"and train.recompute_num_layers >= 1; got {t.recompute_method!r} and {t.recompute_num_layers}"
            )
    elif t.recompute_method is not None or t.recompute_num_layers is not None:
        problems.append(
            f"train.recompute_method / recompute_num_layers have no effect with train.recompute_granularity="
            f"{t.recompute_granularity!r}; they belong to 'full'"
        )
    if o.min_lr > o.lr:
        problems.append(f"optim.min_lr={o.min_lr} is larger than optim.lr={o.lr}")
    if o.lr_warmup_steps < 0 or o.lr_warmup_steps > t.train_iters:
        problems.append(f"optim.lr_warmup_steps={o.lr_warmup_steps} must be in [0, train.train_iters={t.train_iters}]")
    if o.clip_grad < 0:
        problems.append(f"optim.clip_grad={o.clip_grad} must be >= 0 (0 disables clipping)")

    problems += _precision_problems(cfg)
    problems += _stage_problems(cfg)

    if problems:
        raise ConfigValidationError(problems)
    for message in config_warnings(cfg):
        warnings.warn(message, ConfigWarning, stacklevel=2)


def _precision_problems(cfg: RunConfig) -> list[str]:
    """FP8 runs through Transformer Engine in bf16 training; options that would have no effect
    are errors (no dead flags)."""
    pr, m = cfg.precision, cfg.model
    defaults = PrecisionConfig()
    changed = [
        f.name for f in dataclasses.fields(pr)
        if f.name != "fp8" and getattr(pr, f.name) != getattr(defaults, f.name)
    ]
    if pr.fp8 is None:
        return [
            f"precision.{name}={getattr(pr, name)!r} has no effect while precision.fp8 is null; "
            f"set precision.fp8 to one of {FP8_FORMATS} or leave it out"
            for name in changed
        ]
    problems = []
    if m.layer_backend == "local":
        problems.append(
            f"precision.fp8={pr.fp8!r} runs through Transformer Engine but model.layer_backend='local'; "
            "use one of ['auto', 'transformer_engine']"
        )
    if m.params_dtype != "bf16":
        problems.append(f"precision.fp8={pr.fp8!r} needs model.params_dtype='bf16'; got {m.params_dtype!r}")
    if pr.fp8_recipe != "delayed":
        problems += [
            f"precision.{name}={getattr(pr, name)!r} only applies to precision.fp8_recipe='delayed' "
            f"(got {pr.fp8_recipe!r})"
            for name in ("fp8_amax_history_len", "fp8_amax_compute_algo") if name in changed
        ]
    if not pr.fp8_wgrad:
        problems.append(
            "precision.fp8_wgrad=false has no effect with Transformer Engine 2.20: Megatron-Core hands it to "
            "DelayedScaling as override_linear_precision, a field TE removed in 2.0 (its pydantic recipe "
            "drops it silently), and the other recipes never read it; weight gradients run in FP8 "
            "whatever it says. Leave it out (true)"
        )
    if pr.fp8_amax_history_len < 1:
        problems.append(f"precision.fp8_amax_history_len={pr.fp8_amax_history_len} must be >= 1")
    if pr.fp8_margin < 0:
        problems.append(f"precision.fp8_margin={pr.fp8_margin} must be >= 0")
    if pr.first_last_layers_bf16:
        if pr.fp8_recipe == "delayed":
            problems.append(
                "precision.first_last_layers_bf16=true is not supported with precision.fp8_recipe='delayed'; "
                f"use one of {FP8_RECIPES_WITH_BF16_EDGES}"
            )
        # Megatron-Core's bound: at most one stage's worth of layers at either end.
        per_stage = m.num_layers // max(cfg.parallel.pipeline_model_parallel_size, 1)
        for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            value = getattr(pr, name)
            if not 0 <= value <= per_stage:
                problems.append(f"precision.{name}={value} must be in [0, {per_stage}] (layers per pipeline stage)")
    else:
        problems += [
            f"precision.{name}={getattr(pr, name)} has no effect while precision.first_last_layers_bf16 is false"
            for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16") if name in changed
        ]
    return problems


def resolve_layer_backend(cfg: RunConfig, *, cuda_available: bool, te_installed: bool) -> LayerBackend:
    """The language model's layer backend on a machine with these facts (`auto`: Transformer
    Engine when a GPU and TE are both present). Kept apart from `validate_config`, which also runs
    on machines that only prepare a GPU job, and free of probing so it can be tested anywhere."""
    requested = cfg.model.layer_backend
    missing = []
    if not cuda_available:
        missing.append("no CUDA device is visible (torch.cuda.is_available() is False)")
    if not te_installed:
        missing.append("transformer_engine is not installed (the project's `gpu` extra)")
    if requested == "local":
        backend: LayerBackend = "local"
    elif requested == "transformer_engine":
        if missing:
            raise ConfigValidationError(
                [f"model.layer_backend='transformer_engine' cannot run here: {'; '.join(missing)}; "
                 "use model.layer_backend='auto' or 'local'"]
            )
        backend = "transformer_engine"
    else:
        backend = "local" if missing else "transformer_engine"
    fp8 = cfg.precision.fp8
    if fp8 is not None and backend != "transformer_engine":
        why = "; ".join(missing) or "model.layer_backend='local'"
        raise ConfigValidationError(
            [f"precision.fp8={fp8!r} needs the transformer_engine layer backend, but model.layer_backend="
             f"{requested!r} resolves to 'local' here ({why}); set precision.fp8=null to run without a GPU"]
        )
    return backend


def _stage_problems(cfg: RunConfig) -> list[str]:
    """The `revisual train` sections: every listed stage configured, sizes consistent."""
    from megatron_revisual.rl.rewards import reward_config_problems

    problems = []
    if len(set(cfg.stages)) != len(cfg.stages):
        problems.append(f"stages={cfg.stages} lists a stage twice")
    for name in cfg.stages:
        if getattr(cfg, name) is None:
            problems.append(f"stages lists {name!r} but the config has no '{name}' section")
    optim_fields = {f.name for f in dataclasses.fields(OptimConfig)}
    sft = cfg.cold_start
    if sft is not None:
        d = sft.data
        if d.conversation_key is not None:
            problems += [
                f"cold_start.data.{name}={getattr(d, name)!r} has no effect with cold_start.data."
                f"conversation_key={d.conversation_key!r} (the prompt and response are its turns); drop it"
                for name in _changed(d, ("prompt_key", "response_key"))
            ]
        elif d.response_key is None:
            problems.append("cold_start.data.response_key must name the column holding the SFT responses "
                            "(or conversation_key the column of chat turns)")
        if sft.epochs < 1 and sft.train_iters is None:
            problems.append(f"cold_start.epochs={sft.epochs} must be >= 1")
        if sft.train_iters is not None and sft.train_iters < 1:
            problems.append(f"cold_start.train_iters={sft.train_iters} must be >= 1")
        if sft.global_batch_size < 1 or sft.max_length < 2:
            problems.append(
                f"cold_start.global_batch_size={sft.global_batch_size} must be >= 1 and "
                f"cold_start.max_length={sft.max_length} >= 2"
            )
        if not 0 <= sft.lr_warmup_fraction < 1:
            problems.append(f"cold_start.lr_warmup_fraction={sft.lr_warmup_fraction} must be in [0, 1)")
    for name in ("mrl", "trl"):
        g = getattr(cfg, name)
        if g is None:
            continue
        for where, d in ((f"{name}.data", g.data), (f"{name}.validation.data", g.validation.data)):
            if d is not None and d.conversation_key is not None:
                problems.append(f"{where}.conversation_key: GRPO stages read prompt_key and answer_key, "
                                "not conversations; leave it unset")
        r, rl = g.rollout, g.rl
        if g.steps < 1:
            problems.append(f"{name}.steps={g.steps} must be >= 1")
        if r.n < 2:
            problems.append(f"{name}.rollout.n={r.n} must be >= 2 (GRPO normalises within a prompt's group)")
        if g.rollout_batch_size < 1 or g.global_batch_size < 1:
            problems.append(
                f"{name}.rollout_batch_size={g.rollout_batch_size} and {name}.global_batch_size="
                f"{g.global_batch_size} must be >= 1"
            )
        elif g.rollout_batch_size % g.global_batch_size:
            problems.append(
                f"{name}.rollout_batch_size={g.rollout_batch_size} prompts is not a multiple of "
                f"{name}.global_batch_size={g.global_batch_size} (prompts per update)"
            )
        if r.max_response_length < 1 or r.max_prompt_length < 1:
            problems.append(f"{name}.rollout.max_prompt_length and max_response_length must be >= 1")
        elif g.micro_batch_tokens < r.max_prompt_length + r.max_response_length:
            problems.append(
                f"{name}.micro_batch_tokens={g.micro_batch_tokens} is smaller than the longest sample "
                f"(rollout.max_prompt_length + max_response_length = "
                f"{r.max_prompt_length + r.max_response_length})"
            )
        if not 0 < r.top_p <= 1 or r.temperature < 0:
            problems.append(f"{name}.rollout: top_p={r.top_p} must be in (0, 1], temperature={r.temperature} >= 0")
        world, tp = cfg.cluster.world_size, r.tensor_parallel_size
        if tp < 1 or world % tp:
            problems.append(
                f"{name}.rollout.tensor_parallel_size={tp} must divide the world size {world}; "
                f"use one of {divisors(world)}"
            )
        if r.engine == "transformers" and tp != 1:
            problems.append(f"{name}.rollout.tensor_parallel_size={tp}: the transformers engine has no tensor "
                            "parallelism; use 1 (one engine per rank)")
        train_tp = cfg.parallel.tensor_model_parallel_size
        if tp >= 1 and train_tp % tp and tp % train_tp:
            problems.append(
                f"{name}.rollout.tensor_parallel_size={tp} and parallel.tensor_model_parallel_size="
                f"{train_tp}: one must divide the other (an engine's weights are gathered or split "
                "within the training TP group)"
            )
        problems += reward_config_problems(
            preset=rl.reward_preset, grader=rl.reward_grader, weights=rl.reward_weights,
            length_budget=rl.length_budget,
            names={k: f"{name}.rl.{v}" for k, v in (("preset", "reward_preset"), ("grader", "reward_grader"),
                                                    ("weights", "reward_weights"), ("length_budget", "length_budget"))},
        )
        if rl.ppo_epochs < 1:
            problems.append(f"{name}.rl.ppo_epochs={rl.ppo_epochs} must be >= 1")
        problems += _objective_problems(name, rl, r.temperature)
        if rl.pad.enabled:
            problems += _pad_problems(name, rl.pad)
        if g.validation.every < 0:
            problems.append(f"{name}.validation.every={g.validation.every} must be >= 0")
        if g.validation.every and g.validation.data is None:
            problems.append(f"{name}.validation.every={g.validation.every} needs {name}.validation.data")
        if name == "trl" and g.freeze_vision_tower:
            problems.append("trl.freeze_vision_tower has no effect: text GRPO never runs the vision tower")
    for name in ("cold_start", "mrl", "trl"):
        stage = getattr(cfg, name)
        if stage is not None:
            for where, d in ((f"{name}.data", stage.data), (f"{name}.validation.data",
                                                            getattr(getattr(stage, "validation", None), "data", None))):
                if d is not None and d.max_rows is not None and d.max_rows < 1:
                    problems.append(f"{where}.max_rows={d.max_rows} must be >= 1 (or null: every row)")
            bad = sorted(set(stage.optim) - optim_fields)
            if bad:
                problems.append(f"{name}.optim: unknown fields {bad}; use {sorted(optim_fields)}")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1:
        problems.append(
            f"checkpoint.every={cfg.checkpoint.every} must be >= 0 and checkpoint.keep_last="
            f"{cfg.checkpoint.keep_last} >= 1"
        )
    return problems


def _changed(obj: object, names: tuple[str, ...]) -> list[str]:
    """The fields among `names` that differ from their dataclass default."""
    fields = {f.name: f for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    return [n for n in names if getattr(obj, n) != fields[n].default]


def _objective_problems(name: str, rl: RLConfig, temperature: float) -> list[str]:
    """The loss, KL placement and rollout correction of a GRPO stage; options of the loss that
    is not chosen are errors (no dead flags)."""
    where = f"{name}.rl"
    problems = []
    unused = ("clip_low", "clip_high", "clip_dual") if rl.policy_loss == "gspo" else ("gspo_clip_low", "gspo_clip_high")
    problems += [
        f"{where}.{field}={getattr(rl, field)} has no effect with {where}.policy_loss={rl.policy_loss!r}"
        for field in _changed(rl, unused)
    ]
    low, high = (rl.gspo_clip_low, rl.gspo_clip_high) if rl.policy_loss == "gspo" else (rl.clip_low, rl.clip_high)
    if not (0 <= low < 1 and high >= 0):
        problems.append(f"{where}: the {rl.policy_loss} clip range needs 0 <= low ({low}) < 1 and high ({high}) >= 0")
    if rl.policy_loss == "ppo" and not rl.clip_dual > 1:
        problems.append(f"{where}.clip_dual={rl.clip_dual} must be > 1")
    if rl.kl_in_reward and rl.kl_coef <= 0:
        problems.append(f"{where}.kl_in_reward=true has no effect with {where}.kl_coef={rl.kl_coef}; set kl_coef > 0")
    rc = rl.rollout_correction
    problems += rc.problems(f"{where}.rollout_correction.")
    if rc.enabled and temperature != 1.0:
        problems.append(
            f"{where}.rollout_correction compares the trainer's log-probs at {name}.rollout.temperature="
            f"{temperature} with the engine's raw (temperature 1) ones; use temperature 1.0 or turn it off"
        )
    return problems


def _pad_problems(name: str, pad: PADConfig) -> list[str]:
    where = f"{name}.rl.pad"
    problems = []
    if not 0 <= pad.t_low <= pad.t_high:
        problems.append(f"{where}: need 0 <= t_low ({pad.t_low}) <= t_high ({pad.t_high})")
    if not pad.ratio > 0:
        problems.append(f"{where}.ratio={pad.ratio} must be > 0")
    # each mode has its own sharpness knob; the other one is a dead flag
    dead = ("alpha", "replacement") if pad.mode == "paper" else ("tau", "tau_start")
    problems += [
        f"{where}.{field}={getattr(pad, field)} has no effect with {where}.mode={pad.mode!r}"
        for field in _changed(pad, dead)
    ]
    for field in ("tau", "tau_start", "alpha"):
        value = getattr(pad, field)
        if value is not None and not (value >= 0 if field == "alpha" else value > 0):
            problems.append(f"{where}.{field}={value} must be {'>= 0' if field == 'alpha' else '> 0'}")
    return problems


class ConfigWarning(UserWarning):
    """A config that runs but likely does not do what its author meant."""


def config_warnings(cfg: RunConfig) -> list[str]:
    """Settings that are legal but defeat their purpose, each naming the numbers."""
    out = []
    for name in ("mrl", "trl"):
        g = getattr(cfg, name)
        if g is None or not g.rl.pad.enabled:
            continue
        pad, n = g.rl.pad, g.rollout_batch_size * g.rollout.n
        if pad.ratio >= 1 and not pad.replacement:
            count = "min(ceil(ratio x N), |E|)" if pad.mode == "paper" else "min(int(ratio x N), |E|)"
            knob = (f"tau={pad.tau if pad.tau is not None else 0.3}" if pad.mode == "paper"
                    else f"alpha={pad.alpha or 1.0}")
            out.append(
                f"{name}.rl.pad cannot prioritise: mode={pad.mode!r} with ratio={pad.ratio} >= |E|/N and no "
                f"replacement draws {count} = |E| of the N = {g.rollout_batch_size} x {g.rollout.n} = {n} "
                f"samples, so every effective sample is kept once and {knob} has no effect (a plain "
                "filter, the paper's GRPO-Filter ablation); use ratio < 1, or mode=released with "
                "replacement=true (the released config: ratio 1.5, alpha 1.5)"
            )
    return out


def validate_for_training(cfg: RunConfig) -> None:
    """What `revisual train` (and the launchers that start it) need beyond `validate_config`:
    stages to run, and a layout its packed SFT / GRPO steps can execute. Kept apart so that the
    same recipe still loads at CP > 1 for model tests, conversion or sizing."""
    problems = []
    if not cfg.stages:
        problems.append("stages is empty: list the stages to run, e.g. [cold_start, mrl, trl]")
    if "mrl" in cfg.stages and cfg.model.vision is None:
        problems.append("stages includes 'mrl' (multimodal GRPO) but the model has no vision tower")
    if cfg.parallel.virtual_pipeline_model_parallel_size is not None:
        problems.append("parallel.virtual_pipeline_model_parallel_size: `revisual train` builds one "
                        "model chunk per pipeline stage; leave it unset")
    if problems:
        raise ConfigValidationError(problems)
