"""The Megatron side of one GRPO step: packed policy micro-batches, log-probs, one update.

    batches = build_policy_batches(samples, config=mrope_config(cfg.model), micro_batch_tokens=8192)
    old = compute_log_probs(policy, batches)                  # every rank gets every value
    ref = compute_log_probs(reference, batches)
    batches = attach_log_probs(batches, old=old, ref=ref)
    metrics = grpo_update(policy, optimizer, batches, kl_coef=2e-3, kl_kind="low_var_kl",
                          entropy_coef=0.02, agg="token-mean")

`samples` are this data-parallel rank's share of the (PAD-selected) rollouts. Every per-token
tensor of a micro-batch is [1, T], laid out like its packed row and aligned to the labels: the
value at position j belongs to the token predicted there (labels[j] = input_ids[j + 1]), so
response token k of a sample whose prompt has P tokens sits at row position start + P - 1 + k.
Only response tokens carry loss (`Sample.target_mask`). With rollout correction,
`apply_rollout_correction` attaches importance weights and takes rejected sequences out of the
loss mask before the update.

The loss of an update is the aggregation (`rl.losses.aggregate_loss`) over ALL response tokens
of the step, on every DP rank together, not a mean of per-micro-batch losses: each micro-batch
contributes its share divided by the global token (or sequence) count, so the loss and the
gradient do not depend on how the step is cut into micro-batches or over DP ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from megatron.core import parallel_state as ps

from megatron_revisual.config.schema import RolloutCorrectionConfig
from megatron_revisual.data.packing import PackedBatch, PositionConfig, Sample, pack_sequences
from megatron_revisual.parallel.chunks import model_chunks
from megatron_revisual.parallel.device import all_reduce, compute_device
from megatron_revisual.rl.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    Aggregation,
    aggregate_loss,
    gspo_policy_loss,
    kl_penalty,
    policy_loss,
)
from megatron_revisual.rl.rollout_correction import rollout_correction
from megatron_revisual.train.schedule import (
    family_of,
    from_last_stage,
    real_vocab_size,
    row_log_probs_and_entropy,
    run_packed_schedule,
    step_if_finite,
)

__all__ = [
    "PolicyMicroBatch",
    "PolicySample",
    "apply_rollout_correction",
    "attach_log_probs",
    "build_policy_batches",
    "compute_log_probs",
    "global_loss_counts",
    "grpo_update",
    "response_values",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicySample:
    """One rollout to train on: prompt and response token ids ([P], [R]; image placeholders
    already expanded in the prompt), its advantage, optional media and optional per-response-
    token log-probs ([R]): old and reference (when computed elsewhere), and the rollout
    engine's (for rollout correction)."""

    prompt_ids: torch.Tensor
    response_ids: torch.Tensor
    advantage: float
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    rollout_log_probs: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyMicroBatch:
    """A packed row and its per-token RL tensors ([1, T], aligned to the labels; 0 where
    `packed.loss_mask` is 0). `sequence_index[0, j]` is the row's sequence that position j's
    loss token belongs to (-1 off the loss mask); `sample_index` the input samples in row order.
    `is_weights`: rollout-correction weights of the policy loss (`apply_rollout_correction`)."""

    packed: PackedBatch
    advantages: torch.Tensor
    sequence_index: torch.Tensor
    sample_index: tuple[int, ...]
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    rollout_log_probs: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Response (loss) tokens in the row."""
        return int(self.packed.loss_mask.sum())

    @property
    def num_sequences(self) -> int:
        return len(self.sample_index)

    @property
    def row_length(self) -> int:
        return int(self.packed.input_ids.shape[1])


def _group_samples(
    lengths: list[int], micro_batch_tokens: int | None, micro_batch_size: int | None
) -> list[list[int]]:
    """Consecutive runs of sample indices: order is kept so the layout is deterministic."""
    if (micro_batch_tokens is None) == (micro_batch_size is None):
        raise ValueError("give exactly one of micro_batch_tokens and micro_batch_size")
    if micro_batch_size is not None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        return [list(range(i, min(i + micro_batch_size, len(lengths))))
                for i in range(0, len(lengths), micro_batch_size)]
    assert micro_batch_tokens is not None
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if n > micro_batch_tokens:
            raise ValueError(
                f"sample {i} has {n} tokens (prompt + response), more than micro_batch_tokens="
                f"{micro_batch_tokens}; raise it to at least the longest prompt + response"
            )
        if not groups or used + n > micro_batch_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def _per_response(
    values: Sequence[torch.Tensor | None], positions: list[torch.Tensor], total: int, what: str
) -> torch.Tensor | None:
    """Scatter per-response-token values to their label positions in a [1, total] row."""
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError(f"{what} must be given for every sample of a micro-batch or for none")
    row = torch.zeros(total, dtype=torch.float32)
    for v, where in zip(values, positions, strict=True):
        row[where] = v.reshape(-1).float()  # type: ignore[union-attr]
    return row.unsqueeze(0)


def build_policy_batches(
    samples: Sequence[PolicySample],
    *,
    config: PositionConfig | None,
    micro_batch_tokens: int | None = None,
    micro_batch_size: int | None = None,
    pad_to_multiple_of: int = 1,
    cp_size: int = 1,
    pad_token_id: int = 0,
) -> list[PolicyMicroBatch]:
    """Pack `samples` (in order) into micro-batches of at most `micro_batch_tokens` tokens or of
    `micro_batch_size` samples; loss on response tokens only, advantages (and any given
    log-probs) at the label positions of the response tokens. `pad_to_multiple_of`: the row
    multiple (`stages.row_multiple`); `cp_size`: every sequence padded to a multiple of 2 x CP."""
    for i, s in enumerate(samples):
        r = s.response_ids.numel()
        if r == 0 or s.prompt_ids.numel() == 0:
            raise ValueError(f"sample {i}: prompt and response must be non-empty, got "
                             f"{s.prompt_ids.numel()} and {r} tokens")
        for name in ("old_log_probs", "ref_log_probs", "rollout_log_probs"):
            v = getattr(s, name)
            if v is not None and v.numel() != r:
                raise ValueError(f"sample {i}: {name} has {v.numel()} entries for {r} response tokens")
    lengths = [s.prompt_ids.numel() + s.response_ids.numel() for s in samples]
    batches = []
    for group in _group_samples(lengths, micro_batch_tokens, micro_batch_size):
        chosen = [samples[i] for i in group]
        packed = pack_sequences(
            [
                Sample(
                    input_ids=torch.cat([s.prompt_ids.reshape(-1), s.response_ids.reshape(-1)]).long(),
                    target_mask=torch.cat([
                        torch.zeros(s.prompt_ids.numel(), dtype=torch.bool),
                        torch.ones(s.response_ids.numel(), dtype=torch.bool),
                    ]),
                    pixel_values=s.pixel_values,
                    image_grid_thw=s.image_grid_thw,
                    pixel_values_videos=s.pixel_values_videos,
                    video_grid_thw=s.video_grid_thw,
                    second_per_grid_ts=s.second_per_grid_ts,
                )
                for s in chosen
            ],
            config=config,
            pad_to_multiple_of=pad_to_multiple_of,
            cp_size=cp_size,
            pad_token_id=pad_token_id,
        )
        total = int(packed.input_ids.shape[1])
        starts = packed.cu_seqlens_padded[:-1].tolist()
        # response token k is predicted at position start + P - 1 + k
        positions = [
            torch.arange(r) + start + s.prompt_ids.numel() - 1
            for s, start, r in zip(chosen, starts, (s.response_ids.numel() for s in chosen), strict=True)
        ]
        sequence_index = torch.full((total,), -1, dtype=torch.long)
        for k, where in enumerate(positions):
            sequence_index[where] = k
        # the packer's loss mask and our positions are two derivations of the same thing
        assert torch.equal(packed.loss_mask[0].bool(), sequence_index >= 0)
        batches.append(
            PolicyMicroBatch(
                packed=packed,
                advantages=_per_response(
                    [torch.full((s.response_ids.numel(),), float(s.advantage)) for s in chosen],
                    positions, total, "advantages",
                ),
                sequence_index=sequence_index.unsqueeze(0),
                sample_index=tuple(group),
                old_log_probs=_per_response([s.old_log_probs for s in chosen], positions, total, "old_log_probs"),
                ref_log_probs=_per_response([s.ref_log_probs for s in chosen], positions, total, "ref_log_probs"),
                rollout_log_probs=_per_response(
                    [s.rollout_log_probs for s in chosen], positions, total, "rollout_log_probs"
                ),
            )
        )
    return batches


def attach_log_probs(
    micro_batches: Sequence[PolicyMicroBatch],
    *,
    old: Sequence[torch.Tensor] | None = None,
    ref: Sequence[torch.Tensor] | None = None,
) -> list[PolicyMicroBatch]:
    """Copies of `micro_batches` with old-policy and/or reference log-probs (as returned by
    `compute_log_probs`) set."""
    out = []
    for i, mb in enumerate(micro_batches):
        changes = {}
        for name, values in (("old_log_probs", old), ("ref_log_probs", ref)):
            if values is None:
                continue
            if len(values) != len(micro_batches) or values[i].shape != mb.advantages.shape:
                raise ValueError(f"{name} for micro-batch {i} must be {tuple(mb.advantages.shape)}")
            changes[name] = values[i].float()
        out.append(dataclasses.replace(mb, **changes))
    return out


def response_values(micro_batches: Sequence[PolicyMicroBatch],
                    per_token: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per-token row tensors back to {sample index: [R] values of its response tokens}."""
    out = {}
    for mb, row in zip(micro_batches, per_token, strict=True):
        for k, sample in enumerate(mb.sample_index):
            out[sample] = row[0][mb.sequence_index[0] == k]
    return out


def _sequence_rows(mb: PolicyMicroBatch) -> torch.Tensor:
    """[n, T] float mask: row k marks the loss tokens of the row's k-th sequence."""
    return (mb.sequence_index == torch.arange(mb.num_sequences, device=mb.sequence_index.device).unsqueeze(1)).float()


def apply_rollout_correction(
    micro_batches: Sequence[PolicyMicroBatch], config: RolloutCorrectionConfig
) -> tuple[list[PolicyMicroBatch], torch.Tensor, torch.Tensor]:
    """Copies of `micro_batches` (with old and rollout log-probs) carrying the correction's loss
    weights, rejected sequences taken off the loss mask, plus this rank's statistics summed
    over them (`rl.rollout_correction`: sums and maxima, to be reduced over DP)."""
    out, sums, maxima = [], [], []
    for i, mb in enumerate(micro_batches):
        if mb.old_log_probs is None or mb.rollout_log_probs is None:
            raise ValueError(f"micro-batch {i}: rollout correction needs old and rollout log-probs")
        rows = _sequence_rows(mb)
        weights, keep, s, top = rollout_correction(
            mb.old_log_probs.expand_as(rows), mb.rollout_log_probs.expand_as(rows), rows, config
        )
        # every position belongs to at most one row: summing the rows packs them back
        kept = (keep.float() * rows).sum(0, keepdim=True)
        packed = dataclasses.replace(mb.packed, loss_mask=mb.packed.loss_mask * kept)
        out.append(dataclasses.replace(
            mb, packed=packed,
            sequence_index=torch.where(kept > 0, mb.sequence_index, torch.full_like(mb.sequence_index, -1)),
            is_weights=None if weights is None else (weights * rows).sum(0, keepdim=True),
        ))
        sums.append(s)
        maxima.append(top)
    return out, torch.stack(sums).sum(0), torch.stack(maxima).max(0).values


# ---------------------------------------------------------------------------------------------
# Running the model through Megatron's pipeline schedule


@torch.no_grad()
def compute_log_probs(
    model: torch.nn.Module | list[torch.nn.Module],
    micro_batches: Sequence[PolicyMicroBatch],
    *,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Per-token log p(label) [1, T] (float32, 0 off the loss mask) of every micro-batch, under
    `model` (the policy for old log-probs, the frozen reference for KL); forward only.
    Collective over the model-parallel group: every rank returns the same values, on the host
    (beside the micro-batches they are attached to)."""
    vocab, family = real_vocab_size(model_chunks(model)[0]), family_of(model_chunks(model)[0])
    for m in model_chunks(model):
        m.eval()

    def loss_func(mb: PolicyMicroBatch, logits: torch.Tensor):
        lp, _ = row_log_probs_and_entropy(logits, mb.packed, vocab, temperature, family=family)
        return logits.new_zeros(()), {"log_probs": lp.float() * mb.packed.loss_mask}

    out = run_packed_schedule(model, micro_batches, loss_func, forward_only=True)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        values = [o["log_probs"].reshape(mb.advantages.shape) for o, mb in zip(out, micro_batches, strict=True)]
    else:
        values = [torch.zeros(mb.advantages.shape, device=compute_device()) for mb in micro_batches]
    return [v.reshape(mb.advantages.shape).cpu() for v, mb in zip(from_last_stage(values), micro_batches, strict=True)]


def global_loss_counts(micro_batches: Sequence[PolicyMicroBatch]) -> tuple[float, float]:
    """Loss tokens and sequences with loss tokens in the whole step (all DP ranks)."""
    counts = torch.tensor(
        [sum(mb.num_tokens for mb in micro_batches),
         sum(int((mb.sequence_index.unique() >= 0).sum()) for mb in micro_batches)],
        dtype=torch.float64,
    )
    if ps.get_data_parallel_world_size() > 1:
        counts = all_reduce(counts, group=ps.get_data_parallel_group())
    return float(counts[0]), float(counts[1])


def grpo_update(
    model: torch.nn.Module | list[torch.nn.Module],
    optimizer: Any,
    micro_batches: Sequence[PolicyMicroBatch],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.25,
    clip_dual: float = 3.0,
    kl_coef: float = 0.0,
    kl_kind: str = "low_var_kl",
    entropy_coef: float = 0.0,
    agg: Aggregation = "token-mean",
    temperature: float = 1.0,
    scheduler: Any | None = None,
    loss_type: str = "ppo",
) -> dict[str, float]:
    """One optimizer step over all `micro_batches` (gradient accumulation in the schedule).

    loss = policy_loss + kl_coef * KL(pi || pi_ref) - entropy_coef * entropy, each aggregated with
    `agg` over the whole step (module docstring). `loss_type` "ppo" (`rl.losses.policy_loss`,
    clip_low / clip_high / clip_dual) or "gspo" (`gspo_policy_loss`, clip_low / clip_high in its
    scale); a micro-batch's `is_weights` multiply it. `model`: this rank's Megatron DDP chunk(s);
    `optimizer`: a Megatron optimizer; `scheduler` (optional) is stepped once after it.
    Returns, identical on every rank: loss, pg_loss, kl (the aggregated KL to the reference, when
    reference log-probs are attached), entropy, pg_clipfrac_higher, pg_clipfrac_lower, ppo_kl
    (token means), grad_norm, lr, update_successful, skipped_non_finite, num_tokens,
    num_sequences. A non-finite gradient on any rank skips the optimizer and scheduler step
    (skipped_non_finite = 1, the gradients are dropped).
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; use one of {AGGREGATIONS}")
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {loss_type!r}; use one of {POLICY_LOSSES}")
    if not micro_batches:
        raise ValueError("grpo_update needs at least one micro-batch")
    if any(mb.old_log_probs is None for mb in micro_batches):
        raise ValueError("every micro-batch needs old_log_probs (compute_log_probs + attach_log_probs)")
    has_ref = all(mb.ref_log_probs is not None for mb in micro_batches)
    if kl_coef and not has_ref:
        raise ValueError(f"kl_coef={kl_coef} needs ref_log_probs on every micro-batch")
    chunks = model_chunks(model)
    vocab, family = real_vocab_size(chunks[0]), family_of(chunks[0])
    tokens, sequences = global_loss_counts(micro_batches)
    if tokens == 0:
        raise ValueError("grpo_update: no loss token in the whole step (every sequence rejected?)")
    # The share of the step's aggregate each micro-batch's local aggregate stands for.
    per_token = agg == "token-mean"
    denominator = tokens if per_token else sequences
    names = ("loss", "pg_loss", "kl", "entropy", "pg_clipfrac_higher", "pg_clipfrac_lower", "ppo_kl")

    def loss_func(mb: PolicyMicroBatch, logits: torch.Tensor):
        lp, entropy = row_log_probs_and_entropy(logits, mb.packed, vocab, temperature, family=family)
        # One row per packed sequence, so the seq-mean aggregations see sequences.
        n = mb.num_sequences
        rows = _sequence_rows(mb)  # [n, T]
        expand = lambda t: t.expand(n, -1)  # noqa: E731
        weights = None if mb.is_weights is None else expand(mb.is_weights)
        args = (expand(lp), expand(mb.old_log_probs), expand(mb.advantages), rows)
        if loss_type == "gspo":
            pg, pg_metrics = gspo_policy_loss(*args, clip_low=clip_low, clip_high=clip_high, agg=agg,
                                              is_weights=weights)
        else:
            pg, pg_metrics = policy_loss(*args, clip_low=clip_low, clip_high=clip_high,
                                         clip_dual=clip_dual, agg=agg, is_weights=weights)
        share = (mb.num_tokens if per_token else float((rows.sum(1) > 0).sum())) / denominator
        terms = {"pg_loss": pg * share, "entropy": aggregate_loss(expand(entropy), rows, agg) * share}
        loss = terms["pg_loss"] - entropy_coef * terms["entropy"]
        if has_ref:
            terms["kl"] = aggregate_loss(kl_penalty(expand(lp), expand(mb.ref_log_probs), kl_kind), rows, agg) * share
            loss = loss + kl_coef * terms["kl"]
        token_share = mb.num_tokens / tokens
        stats = {k: v.detach() for k, v in terms.items()}
        stats["loss"] = loss.detach()
        for k in ("pg_clipfrac_higher", "pg_clipfrac_lower", "ppo_kl"):
            stats[k] = pg_metrics[k] * token_share
        vector = torch.stack([stats.get(k, torch.zeros(())).double() for k in names])
        return loss, {"stats": vector}

    for m in chunks:
        m.train()
        if hasattr(m, "zero_grad_buffer"):
            m.zero_grad_buffer()
    optimizer.zero_grad()
    out = run_packed_schedule(chunks, micro_batches, loss_func, forward_only=False)
    lr = float(optimizer.param_groups[0]["lr"])
    finite, update_successful, grad_norm = step_if_finite(chunks, optimizer, scheduler)

    totals = torch.zeros(len(names), dtype=torch.float64, device=compute_device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        totals = torch.stack([o["stats"] for o in out]).sum(0)
        if ps.get_data_parallel_world_size() > 1:
            totals = all_reduce(totals, group=ps.get_data_parallel_group())
    totals = from_last_stage([totals])[0]
    metrics = {k: float(v) for k, v in zip(names, totals.tolist(), strict=True)}
    if not has_ref:
        metrics.pop("kl")
    metrics.update(
        grad_norm=grad_norm,
        lr=lr,
        update_successful=float(bool(update_successful)),
        skipped_non_finite=float(not finite),
        num_tokens=tokens,
        num_sequences=sequences,
    )
    return metrics
