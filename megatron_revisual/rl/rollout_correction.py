"""Rollout correction: the engine that sampled (vLLM, bf16) and the trainer that recomputes the
old log-probs (Megatron, FP8 on H100s) do not give the same probabilities, so the samples are
slightly off-policy. Following verl's rollout correction (``rollout_corr``) and NeMo-RL's
importance-sampling correction, per response token t of sequence i:

    r_t     = pi_old(y_t) / pi_rollout(y_t) = exp(old_t - rollout_t)   (log clamped to +-20)
    token TIS (truncated importance sampling):  w_t = min(r_t, C)
    sequence level, on the geometric mean rho_i = exp(mean_t log r_t) over the response:
      reject:  sequences with rho_i outside [lower, upper] leave the loss; the rest keep w = 1
      mask:    the same, and kept sequences are weighted by rho_i (masked importance sampling)

TIS and ``reject`` combine; ``mask`` carries its own weight, so it excludes TIS. Weights are
constants (no gradient): they change the measure, not the objective. A rejected sequence leaves
the loss and its denominators, as if PAD had not drawn it.

Both log-probs must be of the distribution the policy samples from; the engines report raw
(temperature 1) log-probs, so the correction needs rollout temperature 1 (`config.validate`).

Statistics come as sums (``CORRECTION_SUMS``) and maxima (``CORRECTION_MAXIMA``) so that they add
up over micro-batches and data-parallel ranks; ``correction_metrics`` turns them into the logged
``rollout_corr/*`` values.
"""

from __future__ import annotations

import math

import torch

from megatron_revisual.config.schema import RolloutCorrectionConfig as RolloutCorrection

__all__ = [
    "CORRECTION_MAXIMA",
    "CORRECTION_SUMS",
    "RolloutCorrection",
    "correction_metrics",
    "rollout_correction",
]

_SAFETY = 20.0  # exp(20) ~ 5e8: large enough for any real ratio, finite in float32
CORRECTION_SUMS = ("tokens", "ratio", "tis_capped", "sequences", "seq_ratio", "seq_rejected")
CORRECTION_MAXIMA = ("ratio", "seq_ratio")


def rollout_correction(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    config: RolloutCorrection,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weights, keep, sums, maxima)`` for ``[B, T]`` rows (one response per row):

    weights  ``[B, T]`` float32 loss weights, or None when nothing reweights (no TIS, no mask);
    keep     ``[B, T]`` bool, the response tokens that stay in the loss;
    sums     float64 ``[len(CORRECTION_SUMS)]``, maxima float64 ``[len(CORRECTION_MAXIMA)]``
             (ratios before any cap; rows without response tokens count for nothing).
    """
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    if not (old_log_probs.shape == rollout_log_probs.shape == response_mask.shape) or old_log_probs.dim() != 2:
        raise ValueError(
            "old_log_probs, rollout_log_probs and response_mask must all be [B, T], got "
            f"{tuple(old_log_probs.shape)}, {tuple(rollout_log_probs.shape)}, {tuple(response_mask.shape)}"
        )
    mask = response_mask.bool()
    m = mask.to(torch.float64)
    log_ratio = (old_log_probs.detach().double() - rollout_log_probs.detach().double()) * m
    ratio = torch.exp(log_ratio.clamp(-_SAFETY, _SAFETY))
    tokens = m.sum(dim=-1)
    has_tokens = tokens > 0
    seq_ratio = torch.exp((log_ratio.sum(dim=-1) / tokens.clamp(min=1.0)).clamp(-_SAFETY, _SAFETY))

    weights = None
    capped = torch.zeros((), dtype=torch.float64)
    if config.tis_cap is not None:
        weights = ratio.clamp(max=config.tis_cap) * m
        capped = ((ratio > config.tis_cap) & mask).sum().double()
    keep = mask
    rejected = torch.zeros((), dtype=torch.float64)
    if config.seq is not None:
        lower, upper = config.bounds
        kept_rows = (seq_ratio >= lower) & (seq_ratio <= upper)
        rejected = (~kept_rows & has_tokens).sum().double()
        keep = mask & kept_rows.unsqueeze(-1)
        if config.seq == "mask":
            weights = seq_ratio.unsqueeze(-1) * keep
    if weights is not None:
        weights = (weights * keep).float()

    sequences = has_tokens.sum().double()
    sums = torch.stack([
        m.sum(), (ratio * m).sum(), capped,
        sequences, (seq_ratio * has_tokens).sum(), rejected,
    ])
    maxima = torch.stack([
        ratio.masked_fill(~mask, -math.inf).max() if mask.any() else torch.tensor(0.0, dtype=torch.float64),
        (seq_ratio.masked_fill(~has_tokens, -math.inf).max() if has_tokens.any()
         else torch.tensor(0.0, dtype=torch.float64)),
    ])
    return weights, keep, sums, maxima


def correction_metrics(sums: torch.Tensor, maxima: torch.Tensor, config: RolloutCorrection) -> dict[str, float]:
    """The logged values from summed statistics: mean and max of the token ratio, the fraction of
    tokens TIS capped, and with a sequence test the mean and max geometric-mean ratio and the
    fraction of sequences rejected."""
    s = dict(zip(CORRECTION_SUMS, sums.tolist(), strict=True))
    top = dict(zip(CORRECTION_MAXIMA, maxima.tolist(), strict=True))
    tokens, sequences = max(s["tokens"], 1.0), max(s["sequences"], 1.0)
    out = {"rollout_corr/ratio_mean": s["ratio"] / tokens, "rollout_corr/ratio_max": top["ratio"]}
    if config.tis_cap is not None:
        out["rollout_corr/tis_capped_fraction"] = s["tis_capped"] / tokens
    if config.seq is not None:
        out.update({
            "rollout_corr/seq_ratio_mean": s["seq_ratio"] / sequences,
            "rollout_corr/seq_ratio_max": top["seq_ratio"],
            "rollout_corr/seq_rejected_fraction": s["seq_rejected"] / sequences,
        })
    return out
