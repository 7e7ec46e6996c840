"""`revisual plan CONFIG [overrides]`: whether a layout fits its GPUs, stage by stage, before a
job is queued.

    revisual plan configs/qwen25_vl_7b_8xh100.yaml [parallel.tensor_model_parallel_size=2 ...]
        [--gpu-gib 79.2] [--reserve-gib 3] [--margin-gib 4] [--mfu 0.35] [--peak-tflops 989]

Per GPU of the fullest pipeline stage, for every stage of the curriculum:
- parameters (the model's dtype), gradients (fp32 main-grad buffers: the DDP reduces in fp32)
  and optimizer state (fp32 main parameters + Adam's two moments, 12 bytes per parameter,
  sharded over DP x CP by the distributed optimizer; 8 bytes with fp32 parameters, which are
  their own main copy). Tensor parallelism splits every weight except norms, biases of
  row-parallel layers and the vision patch embedding; the vocabulary is padded to a multiple
  of 128 x TP as Megatron does. A frozen vision tower has no gradients or optimizer state.
- activations of the micro-batches in flight: per layer and token the tensors Megatron keeps
  for the backward pass (the layer's input and norm outputs, Q/K/V, the attention output, the
  MLP's gate/up/activation; no dropout, flash attention keeps no score matrix), in the
  model's dtype, split by TP (sequence parallel) and CP; with full recomputation only each
  layer's input plus one layer's working set. A 1F1B pipeline keeps PP - k micro-batches on
  stage k. The local spec (`model.layer_backend: local`, what CPUs run) keeps more per layer
  (`_activation_bytes_per_token_layer`). Plus, on the last stage, the loss's peak: the logits,
  their gradient and the padded-vocabulary copy in the model's dtype, and one chunk of the
  chunked log-prob / entropy computation in fp32.
- GRPO stages: the reference model (KL) and the colocated engine (`launch.footprint`). The
  engine sleeps while the trainer works (its weights leave the GPU, its KV cache is dropped)
  and the trainer's activations are freed while the engine generates, so the peak is the larger
  of training (resident state + activations) and rollout (resident state + vLLM's share,
  `rollout.gpu_memory_utilization` x the GPU).
- a step-time estimate from FLOPs at a stated MFU: 6 x parameters per token plus causal
  attention (+ a forward with full recomputation; GRPO adds the old- and reference-log-prob
  forwards). Generation is memory-bound and not estimated.
The GPU: the memory CUDA reports (79.2 GiB for an H100 80GB, `--gpu-gib`), less a stated
reserve for what no tensor of ours holds (`RESERVE_GIB`: the CUDA context and kernel images,
NCCL's communicator buffers, cuBLAS / cuDNN / Transformer Engine workspaces; `--reserve-gib`). A
stage fits when its peak leaves at least `MIN_MARGIN_GIB` (4 GiB, `--margin-gib`) of what is left:
the margin absorbs the caching allocator's fragmentation, vLLM's CUDA graphs and vision
activations (not counted), and the planner's own error (within 6% of measured memory on CPU).
For a GRPO stage the plan also gives the largest `rollout.gpu_memory_utilization` its resident
state leaves room for with that margin. When a stage does not fit, the plan names the first
change (of recomputation, a larger CP, a larger TP, a larger PP, that engine share, smaller
micro-batches) that makes it fit.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from collections.abc import Callable

from megatron_revisual.config.schema import ModelConfig, RunConfig
from megatron_revisual.launch.footprint import (
    DTYPE_BYTES,
    GIB,
    H100_GIB,
    parameter_count,
    rollout_footprint,
)

__all__ = ["MIN_MARGIN_GIB", "RESERVE_GIB", "LayerCounts", "StagePlan", "local_parameters", "plan_pipeline_stages",
           "plan_run", "plan_stage"]

VOCAB_DIVISOR = 128  # Megatron's make_vocab_size_divisible_by
# Per GPU, outside every tensor the plan counts (typical sizes on H100s with CUDA 13; stated, not
# measured here: no GPU has run this).
RESERVE_GIB = {
    "CUDA context and kernel images": 0.75,  # larger with Transformer Engine's and vLLM's kernels
    "NCCL communicators": 1.5,  # TP, DP, CP, PP, amax and embedding groups, and vLLM's own
    "cuBLAS / cuDNN / TE workspaces": 0.75,
}
MIN_MARGIN_GIB = 4.0


@dataclasses.dataclass(frozen=True)
class LayerCounts:
    """Parameters of one pipeline stage on one GPU: TP-split ones already divided."""

    language: int
    vision: int

    @property
    def total(self) -> int:
        return self.language + self.vision


def padded_vocab(m: ModelConfig, tp: int) -> int:
    step = VOCAB_DIVISOR * tp
    return math.ceil(m.vocab_size / step) * step


def _stage_layers(num_layers: int, pp: int, first: int | None) -> list[int]:
    if pp == 1:
        return [num_layers]
    if first is None:
        return [num_layers // pp] * pp
    return [first] + [(num_layers - first) // (pp - 1)] * (pp - 1)


def local_parameters(cfg: RunConfig) -> list[LayerCounts]:
    """Parameters on one GPU of each pipeline stage."""
    m, p = cfg.model, cfg.parallel
    t, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    h, f, hd = m.hidden_size, m.ffn_hidden_size, m.head_dim
    q, kv = m.num_attention_heads * hd, m.num_query_groups * hd
    split_layer = h * (q + 2 * kv) + (q + 2 * kv if m.add_qkv_bias else 0) + q * h + 3 * h * f
    layer = split_layer // t + 2 * h  # the two norms are replicated
    embedding = padded_vocab(m, t) * h // t
    vision = 0
    if m.vision is not None:
        v = m.vision
        d, i, merged = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size**2
        block_split = (3 * d * d + 3 * d) + d * d + 2 * (i * d + i) + d * i
        block = block_split // t + 2 * d + d + d  # norms; biases of the row-parallel proj / down
        patch = d * v.in_channels * v.temporal_patch_size * v.patch_size**2
        merger = d + (merged * merged + merged) // t + (h * merged) // t + h
        vision = patch + v.depth * block + merger
    stages = []
    for s, n in enumerate(_stage_layers(m.num_layers, pp, p.num_layers_in_first_pipeline_stage)):
        language = n * layer
        if s == 0:
            language += embedding
        if s == pp - 1:
            language += h  # final norm
            if not m.tie_word_embeddings or pp > 1:
                language += embedding  # output layer (a tied one's copy on the last stage)
        stages.append(LayerCounts(language=language, vision=vision if s == 0 else 0))
    return stages


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagePlan:
    stage: str
    kind: str  # "sft" or "grpo"
    pipeline_stage: int  # the fullest one, whose numbers these are
    gpu_gib: float
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    reference_gib: float
    engine_gib: float  # vLLM's share of the GPU while it generates (0 for SFT)
    engine_weights_gib: float
    kv_cache_gib: float
    step_seconds: float
    tokens_per_step: int
    reserve_gib: float = sum(RESERVE_GIB.values())
    min_margin_gib: float = MIN_MARGIN_GIB
    suggestion: str | None = None

    @property
    def resident_gib(self) -> float:
        return self.params_gib + self.grads_gib + self.optimizer_gib + self.reference_gib

    @property
    def train_peak_gib(self) -> float:
        return self.resident_gib + self.activations_gib + self.logits_gib

    @property
    def rollout_peak_gib(self) -> float:
        return self.resident_gib + self.engine_gib

    @property
    def peak_gib(self) -> float:
        return max(self.train_peak_gib, self.rollout_peak_gib)

    @property
    def margin_gib(self) -> float:
        """What the peak leaves of the GPU after the reserve."""
        return self.gpu_gib - self.reserve_gib - self.peak_gib

    @property
    def fits(self) -> bool:
        return self.margin_gib >= self.min_margin_gib

    @property
    def largest_engine_share(self) -> float | None:
        """The largest rollout.gpu_memory_utilization (two decimals, rounded down) that leaves the
        margin beside this stage's resident training state; None for SFT."""
        if self.kind != "grpo":
            return None
        room = self.gpu_gib - self.reserve_gib - self.min_margin_gib - self.resident_gib
        return max(0.0, math.floor(room / self.gpu_gib * 100 + 1e-9) / 100)

    def table(self) -> str:
        rows = [
            ("parameters", self.params_gib), ("gradients (fp32)", self.grads_gib),
            ("optimizer state", self.optimizer_gib), ("reference model", self.reference_gib),
            ("activations", self.activations_gib), ("logits, grad, loss chunk", self.logits_gib),
            ("training peak", self.train_peak_gib),
        ]
        if self.kind == "grpo":
            rows += [("engine share (weights + KV + vLLM)", self.engine_gib),
                     ("  of which weights", self.engine_weights_gib),
                     ("  of which KV cache (bound)", self.kv_cache_gib),
                     ("rollout peak", self.rollout_peak_gib)]
        lines = [f"  {name:<36} {gib:8.2f} GiB" for name, gib in rows]
        lines.append(f"  {'peak':<36} {self.peak_gib:8.2f} GiB")
        lines.append(f"  {'reserve (CUDA, NCCL, workspaces)':<36} {self.reserve_gib:8.2f} GiB")
        verdict = "fits" if self.fits else f"DOES NOT FIT (needs a margin of {self.min_margin_gib:g} GiB)"
        lines.append(f"  {'margin':<36} {self.margin_gib:8.2f} GiB of {self.gpu_gib:g}: {verdict}")
        if self.largest_engine_share is not None:
            lines.append(f"  {'largest engine share with the margin':<36} {self.largest_engine_share:8.2f}"
                         f" (rollout.gpu_memory_utilization)")
        lines.append(f"  {'step (training FLOPs at the MFU)':<36} {self.step_seconds:8.1f} s "
                     f"({self.tokens_per_step:,} tokens)")
        if self.suggestion:
            lines.append(f"  to fit: {self.suggestion}")
        return "\n".join(lines)


def _activation_bytes_per_token_layer(m: ModelConfig, dtype_bytes: int, backend: str = "transformer_engine") -> int:
    """Tensors one layer keeps for backward, per token (before TP / CP splitting).

    Transformer Engine: the layer's input and norm output (attention), Q K V, the attention
    output, input and norm output (MLP), gate and up, the activation (fc2's input).
    The local spec (plain torch modules; what runs on CPU), counted from the tensors autograd
    saves in one layer (torch.autograd.graph.saved_tensors_hooks): each RMSNorm keeps its input
    and output (4h), the QKV and fc1 linears a separate copy of their input (2h), the output
    projection its input (q), the fused QKV output (2 x KV groups + q: V stays a view of it), the
    rotated Q and K, the attention output (q, kv, q), the rotary cos / sin of Q and K (4 x
    head_dim), flash attention's log-sum-exp (heads), the fc1 output (2f), the gated product's
    operands (2f) and fc2's input (f)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    if backend == "local":
        return dtype_bytes * (6 * h + 4 * q + 3 * kv + 5 * f + 4 * m.head_dim + m.num_attention_heads)
    return dtype_bytes * (2 * h + q + 2 * kv + q + 2 * h + 2 * f + f)


def _layer_backend(m: ModelConfig) -> str:
    """The backend a plan assumes: `auto` plans for GPUs, i.e. Transformer Engine."""
    return "local" if m.layer_backend == "local" else "transformer_engine"


def _logits_bytes(tokens: int, local_vocab: int, dtype_bytes: int) -> int:
    """The last stage's loss peak: the logits and their gradient in the model's dtype plus the
    copy the loss masks the TP padding into (or divides by the temperature), and the float32
    working set of one chunk of `rl.logprobs` (about 4 [chunk, V / TP] tensors)."""
    from megatron_revisual.rl.logprobs import chunk_rows

    chunk = min(tokens, chunk_rows(local_vocab))
    return tokens * local_vocab * 3 * dtype_bytes + chunk * local_vocab * 4 * 4


def plan_stage(cfg: RunConfig, stage: str, *, gpu_gib: float = H100_GIB, mfu: float = 0.35,
               peak_tflops: float = 989.0, reserve_gib: float | None = None,
               margin_gib: float = MIN_MARGIN_GIB) -> StagePlan:
    """The memory and step time of `stage` (a name in cfg.stages) on one GPU of its fullest
    pipeline stage. `reserve_gib` None: the sum of `RESERVE_GIB`."""
    plans = plan_pipeline_stages(cfg, stage, gpu_gib=gpu_gib, mfu=mfu, peak_tflops=peak_tflops,
                                 reserve_gib=reserve_gib, margin_gib=margin_gib)
    return max(plans, key=lambda plan: plan.peak_gib)


def plan_pipeline_stages(cfg: RunConfig, stage: str, *, gpu_gib: float = H100_GIB, mfu: float = 0.35,
                         peak_tflops: float = 989.0, reserve_gib: float | None = None,
                         margin_gib: float = MIN_MARGIN_GIB) -> list[StagePlan]:
    """`plan_stage` for every pipeline stage, in order."""
    reserve = sum(RESERVE_GIB.values()) if reserve_gib is None else reserve_gib
    return [dataclasses.replace(_plan_pipeline_stage(cfg, stage, k, gpu_gib=gpu_gib, mfu=mfu, peak_tflops=peak_tflops),
                                reserve_gib=reserve, min_margin_gib=margin_gib)
            for k in range(cfg.parallel.pipeline_model_parallel_size)]


def _plan_pipeline_stage(cfg: RunConfig, stage: str, k: int, *, gpu_gib: float, mfu: float,
                         peak_tflops: float) -> StagePlan:
    m, p, t_cfg = cfg.model, cfg.parallel, cfg.train
    s = getattr(cfg, stage)
    grpo = hasattr(s, "rollout")
    t, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    world = cfg.cluster.world_size
    dp = max(1, world // (t * pp * cp))
    dtype_bytes = DTYPE_BYTES[m.params_dtype]
    mine = local_parameters(cfg)[k]
    frozen_vision = grpo and getattr(s, "freeze_vision_tower", False)
    trainable = mine.language + (0 if frozen_vision else mine.vision)
    params = mine.total * dtype_bytes
    grads = trainable * 4
    state_bytes = 12 if dtype_bytes < 4 else 8
    optimizer = trainable * state_bytes / (dp * cp if p.use_distributed_optimizer else 1)

    tokens = (s.micro_batch_tokens if grpo else s.max_length) // cp
    layers = _stage_layers(m.num_layers, pp, p.num_layers_in_first_pipeline_stage)[k]
    per_token_layer = _activation_bytes_per_token_layer(m, dtype_bytes, _layer_backend(m)) / t
    if t_cfg.recompute_granularity == "full":
        per_micro = tokens * (layers * m.hidden_size * dtype_bytes / t + per_token_layer)
    elif t_cfg.recompute_granularity == "selective":  # the core attention output is recomputed
        q = m.num_attention_heads * m.head_dim
        per_micro = tokens * layers * (per_token_layer - q * dtype_bytes / t)
    else:
        per_micro = tokens * layers * per_token_layer
    activations = per_micro * (pp - k)  # 1F1B: stage k holds PP - k micro-batches
    logits = _logits_bytes(tokens, padded_vocab(m, t) // t, dtype_bytes) if k == pp - 1 else 0

    reference = engine = engine_weights = kv = 0.0
    if grpo:
        if s.rl.kl_coef > 0:
            reference = mine.total * dtype_bytes
        fp = rollout_footprint(cfg, stage, gpu_gib=gpu_gib)
        engine_weights, kv = fp.weight_gib_per_gpu * GIB, fp.kv_cache_gib_per_gpu * GIB
        engine = s.rollout.gpu_memory_utilization * gpu_gib * GIB

    # step time: training FLOPs per token, 6N + causal attention (x 4/3 with full recompute)
    n_params = sum(parameter_count(m).values())  # the whole model
    q = m.num_attention_heads * m.head_dim
    if grpo:
        row = s.rollout.max_prompt_length + s.rollout.max_response_length
        tokens_per_step = s.rollout_batch_size * s.rollout.n * row // 2  # rows half full on average
        mean_context = row // 2
    else:
        tokens_per_step = s.global_batch_size * s.max_length
        mean_context = s.max_length // 2
    forward = 2 * n_params + 2 * m.num_layers * q * mean_context
    train = 3 * forward + (forward if t_cfg.recompute_granularity == "full" else 0)
    if grpo:
        train += forward * (2 if s.rl.kl_coef > 0 else 1)  # old (and reference) log-probs
    seconds = tokens_per_step * train / (world * peak_tflops * 1e12 * mfu)
    return StagePlan(
        stage=stage, kind="grpo" if grpo else "sft", pipeline_stage=k, gpu_gib=gpu_gib,
        params_gib=params / GIB, grads_gib=grads / GIB, optimizer_gib=optimizer / GIB,
        activations_gib=activations / GIB, logits_gib=logits / GIB, reference_gib=reference / GIB,
        engine_gib=engine / GIB, engine_weights_gib=engine_weights / GIB, kv_cache_gib=kv / GIB,
        step_seconds=seconds, tokens_per_step=tokens_per_step,
    )


def _candidates(cfg: RunConfig, stage: str, plan: StagePlan) -> list[tuple[str, Callable[[RunConfig], None]]]:
    """Changes to try, in order, each as (override text, in-place edit of a copy)."""
    p, m = cfg.parallel, cfg.model
    s = getattr(cfg, stage)
    out: list[tuple[str, Callable[[RunConfig], None]]] = []
    if cfg.train.recompute_granularity != "full":
        def full(c: RunConfig) -> None:
            c.train.recompute_granularity, c.train.recompute_method, c.train.recompute_num_layers = "full", "uniform", 1
        out.append(("train.recompute_granularity=full train.recompute_method=uniform "
                    "train.recompute_num_layers=1", full))
    cp2 = p.context_parallel_size * 2  # splits every row's activations and logits
    if cfg.cluster.world_size % (cp2 * p.tensor_model_parallel_size * p.pipeline_model_parallel_size) == 0:
        out.append((f"parallel.context_parallel_size={cp2}",
                    lambda c: setattr(c.parallel, "context_parallel_size", cp2)))
    t2 = p.tensor_model_parallel_size * 2
    if m.num_query_groups % t2 == 0 and cfg.cluster.devices_per_node % t2 == 0:
        out.append((f"parallel.tensor_model_parallel_size={t2}",
                    lambda c: setattr(c.parallel, "tensor_model_parallel_size", t2)))
    pp2 = p.pipeline_model_parallel_size * 2
    if m.num_layers % pp2 == 0 and cfg.cluster.world_size % (pp2 * p.tensor_model_parallel_size) == 0:
        out.append((f"parallel.pipeline_model_parallel_size={pp2}",
                    lambda c: setattr(c.parallel, "pipeline_model_parallel_size", pp2)))
    if hasattr(s, "rollout") and plan.largest_engine_share is not None:
        share = plan.largest_engine_share
        # an engine holds its weights and some KV cache: a share below that is no answer
        if share < s.rollout.gpu_memory_utilization and share * plan.gpu_gib > plan.engine_weights_gib + 2:
            change = (f"{stage}.rollout.gpu_memory_utilization={share}",
                      lambda c: setattr(getattr(c, stage).rollout, "gpu_memory_utilization", share))
            # the engine's share is the first answer when generation is what does not fit
            out.insert(0, change) if plan.rollout_peak_gib >= plan.train_peak_gib else out.append(change)
        half = s.micro_batch_tokens // 2
        out.append((f"{stage}.micro_batch_tokens={half}",
                    lambda c: setattr(getattr(c, stage), "micro_batch_tokens", half)))
    return out


def _with_suggestion(cfg: RunConfig, stage: str, plan: StagePlan, **kw) -> StagePlan:
    if plan.fits:
        return plan
    from megatron_revisual.config.validate import ConfigValidationError, validate_config

    for text, edit in _candidates(cfg, stage, plan):
        changed = copy.deepcopy(cfg)
        edit(changed)
        try:
            validate_config(changed)
        except ConfigValidationError:
            continue
        trial = plan_stage(changed, stage, **kw)
        if trial.fits:
            return dataclasses.replace(plan, suggestion=f"{text} (peak {trial.peak_gib:.1f} GiB)")
    return dataclasses.replace(plan, suggestion="none of recomputation, a larger CP, TP or PP, a smaller engine "
                                                "share or smaller micro-batches is enough: use more GPUs")


def plan_run(cfg: RunConfig, **kw) -> list[StagePlan]:
    """Every stage of cfg.stages, with a suggestion where one does not fit."""
    return [_with_suggestion(cfg, stage, plan_stage(cfg, stage, **kw), **kw) for stage in cfg.stages]


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_model_parallel_size=2")
    parser.add_argument("--gpu-gib", type=float, default=H100_GIB,
                        help=f"memory CUDA reports for one GPU (default {H100_GIB}: H100 80GB)")
    parser.add_argument("--reserve-gib", type=float, default=sum(RESERVE_GIB.values()),
                        help="per GPU, for the CUDA context, NCCL buffers and library workspaces (default "
                             + ", ".join(f"{k} {v:g}" for k, v in RESERVE_GIB.items()) + ")")
    parser.add_argument("--margin-gib", type=float, default=MIN_MARGIN_GIB,
                        help=f"the least a stage's peak must leave after the reserve (default {MIN_MARGIN_GIB:g})")
    parser.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilization for the step time")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOPs of one GPU (H100 SXM)")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; exit 1 when a stage does not fit."""
    from megatron_revisual.prepare import load_config_as_prepared

    cfg = load_config_as_prepared(args.config, args.overrides)
    p = cfg.parallel
    print(f"{args.config}: {cfg.cluster.world_size} GPUs, TP {p.tensor_model_parallel_size} x "
          f"PP {p.pipeline_model_parallel_size} x CP {p.context_parallel_size}, {cfg.model.params_dtype}; "
          f"per GPU of the fullest pipeline stage, {args.gpu_gib:g} GiB, reserve {args.reserve_gib:g} GiB, "
          f"margin {args.margin_gib:g} GiB, MFU {args.mfu:g}")
    plans = plan_run(cfg, gpu_gib=args.gpu_gib, mfu=args.mfu, peak_tflops=args.peak_tflops,
                     reserve_gib=args.reserve_gib, margin_gib=args.margin_gib)
    for plan in plans:
        where = f", pipeline stage {plan.pipeline_stage}" if p.pipeline_model_parallel_size > 1 else ""
        print(f"\n[{plan.stage}] ({plan.kind}{where})")
        print(plan.table())
    return 0 if all(plan.fits for plan in plans) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="revisual plan", description=__doc__.split("\n")[0])
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
