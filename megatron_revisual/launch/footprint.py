"""Sizes of a run that follow from its config alone: parameters, KV cache per token, and what the
colocated rollout engines of a GRPO stage hold and receive (`rollout.colocated`).

    python -m megatron_revisual.launch.footprint configs/qwen25_vl_7b_8xh100.yaml [overrides]

Parameter counts are the Hugging Face checkpoint's tensors, counted from the shapes of
Qwen2.5-VL (vision tower: patch embedding, blocks, merger; language model: embedding, layers,
final norm, output layer unless tied); `tests/unit/test_launch_footprint.py` checks them
against a generated checkpoint. The engine's KV budget is vLLM's share of the GPU
(`rollout.gpu_memory_utilization` x `gpu_gib`) less its weights; vLLM's own activation profile
comes off that at start-up, so the figure is an upper bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from megatron_revisual.config.schema import ModelConfig, RunConfig

__all__ = ["H100_GIB", "RolloutFootprint", "kv_cache_bytes_per_token", "parameter_count", "rollout_footprint"]

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# The memory CUDA reports for one H100 80GB (torch.cuda.mem_get_info's total): the base of vLLM's
# rollout.gpu_memory_utilization, and what `revisual plan` plans against unless told otherwise.
H100_GIB = 79.2


def parameter_count(m: ModelConfig) -> dict[str, int]:
    """Parameters of the HF checkpoint: {"language": ..., "vision": ...}."""
    h, f, hd = m.hidden_size, m.ffn_hidden_size, m.head_dim
    q, kv = m.num_attention_heads * hd, m.num_query_groups * hd
    attention = h * (q + 2 * kv) + (q + 2 * kv if m.add_qkv_bias else 0) + q * h
    layer = attention + 3 * h * f + 2 * h
    language = m.vocab_size * h * (1 if m.tie_word_embeddings else 2) + m.num_layers * layer + h
    vision = 0
    if m.vision is not None:
        v = m.vision
        d, i, merged = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size**2
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * (i * d + i) + (d * i + d)
        patch = d * v.in_channels * v.temporal_patch_size * v.patch_size**2
        merger = d + (merged * merged + merged) + (h * merged + h)
        vision = patch + v.depth * block + merger
    return {"language": language, "vision": vision}


def kv_cache_bytes_per_token(m: ModelConfig, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token (all KV heads)."""
    return 2 * m.num_layers * m.num_query_groups * m.head_dim * dtype_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutFootprint:
    stage: str
    world_size: int
    train_tp: int
    engine_tp: int
    engines: int
    weight_gib_per_gpu: float  # the engine's share of the weights on each GPU
    kv_cache_gib_per_gpu: float  # upper bound, see the module note
    kv_cache_tokens_per_engine: int
    handed_gib_per_gpu: float  # what each rank streams into its engine per sync (full HF tensors)
    handed_gib_per_gpu_frozen: float  # the same once a frozen vision tower is no longer sent
    gathered_gib_per_gpu: float  # what each rank sends to its TP peers per sync (ring all-gather)

    def table(self) -> str:
        rows = [
            ("engines x engine TP",
             f"{self.engines} x {self.engine_tp} (world {self.world_size}, training TP {self.train_tp})"),
            ("engine weights per GPU", f"{self.weight_gib_per_gpu:.2f} GiB"),
            ("KV cache per GPU (bound)", f"{self.kv_cache_gib_per_gpu:.2f} GiB"),
            ("KV cache per engine", f"{self.kv_cache_tokens_per_engine:,} tokens"),
            ("sync: handed to the engine, per GPU",
             f"{self.handed_gib_per_gpu:.2f} GiB "
             f"({self.handed_gib_per_gpu_frozen:.2f} GiB with a frozen vision tower)"),
            ("sync: sent to TP peers, per GPU", f"{self.gathered_gib_per_gpu:.2f} GiB"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def rollout_footprint(cfg: RunConfig, stage: str, *, gpu_gib: float = H100_GIB) -> RolloutFootprint:
    """The colocated engines of GRPO stage `stage` on `gpu_gib` GPUs."""
    s = getattr(cfg, stage)
    r, m, p = s.rollout, cfg.model, cfg.parallel
    world = cfg.cluster.world_size
    dtype_bytes = DTYPE_BYTES[m.params_dtype]
    counts = parameter_count(m)
    full = (counts["language"] + counts["vision"]) * dtype_bytes
    engine_tp = r.tensor_parallel_size
    engines = world // engine_tp if r.placement == "colocated" else 1
    weights = full / engine_tp
    kv_bytes = max(0.0, r.gpu_memory_utilization * gpu_gib * GIB - weights)
    # each rank gathers its stage's TP-split tensors (treated here as all of them) in its group;
    # an engine of the trainer's TP takes the decoder layers from the local shards (only the
    # embeddings and the vision tower are gathered)
    t, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    gathered_part = full
    if engine_tp == t and r.placement == "colocated":
        embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
        gathered_part = (embeddings + counts["vision"]) * dtype_bytes
    gathered = (t - 1) / t * gathered_part / pp
    return RolloutFootprint(
        stage=stage, world_size=world, train_tp=t, engine_tp=engine_tp, engines=engines,
        weight_gib_per_gpu=weights / GIB, kv_cache_gib_per_gpu=kv_bytes / GIB,
        kv_cache_tokens_per_engine=int(kv_bytes * engine_tp // kv_cache_bytes_per_token(m, dtype_bytes)),
        handed_gib_per_gpu=full / GIB, handed_gib_per_gpu_frozen=counts["language"] * dtype_bytes / GIB,
        gathered_gib_per_gpu=gathered / GIB,
    )


def main(argv: list[str] | None = None) -> int:
    from megatron_revisual.config import load_config

    parser = argparse.ArgumentParser(prog="python -m megatron_revisual.launch.footprint",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--gpu-gib", type=float, default=H100_GIB)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    counts = parameter_count(cfg.model)
    print(f"{args.config}: {counts['language'] / 1e9:.3f} B language + "
          f"{counts['vision'] / 1e9:.3f} B vision parameters")
    for stage in cfg.stages:
        if stage in ("mrl", "trl"):
            print(f"\n[{stage}] on {args.gpu_gib:g} GiB GPUs")
            print(rollout_footprint(cfg, stage, gpu_gib=args.gpu_gib).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
