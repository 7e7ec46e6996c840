"""Do the rollout engine and the trainer agree on the policy? Compare the engine's raw
log-probs of its own samples with Megatron's recomputation from the same weights.

    metrics = logprob_consistency(engine_lp, megatron_lp, mask, raise_if_mean_above=1e-2)
    logger.log(metrics)   # rollout/logprob_abs_diff_mean, ..._max, rollout/prob_ratio_error_*

After a correct weight sync the gap is numerical noise (fp32 on CPU: ~1e-6 mean); a wrong
mapping, a stale cache or a missed tensor gives gaps of order 0.1-1. The probability ratio
error ``|exp(lp_megatron - lp_engine) - 1|`` is what PPO's clipped ratio sees when the engine's
log-probs stand in for the old policy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["LogprobGapError", "logprob_consistency", "pad_ragged"]


class LogprobGapError(RuntimeError):
    """The engine and the trainer disagree by more than the configured bound."""

    def __init__(self, message: str, metrics: dict[str, float]) -> None:
        super().__init__(message)
        self.metrics = metrics


def pad_ragged(rows: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> ``(values [B, T] float64, mask [B, T] bool)``."""
    width = max((len(r) for r in rows), default=0)
    values = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.float64)
        mask[i, : len(r)] = True
    return values, mask


def _as_tensor(
    x: torch.Tensor | Sequence[Sequence[float]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu(), None
    return pad_ragged(x)


def logprob_consistency(
    engine_logprobs: torch.Tensor | Sequence[Sequence[float]],
    megatron_logprobs: torch.Tensor | Sequence[Sequence[float]],
    mask: torch.Tensor | None = None,
    *,
    raise_if_mean_above: float | None = None,
    raise_if_max_above: float | None = None,
    prefix: str = "rollout/",
) -> dict[str, float]:
    """Mean / max absolute log-prob difference and probability-ratio error over the tokens in
    ``mask`` (tensors ``[B, T]``), or over every token of ragged per-sample lists (then the two
    must have the same row lengths). Raises ``LogprobGapError`` when a bound is exceeded; a
    non-finite value counts as an infinite gap."""
    engine, engine_mask = _as_tensor(engine_logprobs)
    megatron, megatron_mask = _as_tensor(megatron_logprobs)
    if engine.shape != megatron.shape:
        raise ValueError(
            f"engine log-probs {tuple(engine.shape)} and Megatron log-probs "
            f"{tuple(megatron.shape)} differ in shape"
        )
    if mask is None:
        if engine_mask is None or megatron_mask is None:
            raise ValueError("pass mask= with padded [B, T] tensors")
        if not torch.equal(engine_mask, megatron_mask):
            bad = (engine_mask != megatron_mask).any(-1).nonzero().flatten().tolist()
            raise ValueError(f"ragged rows {bad[:5]} have different lengths on the two sides")
        mask = engine_mask
    mask = mask.to(torch.bool).cpu()
    if mask.shape != engine.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match log-probs {tuple(engine.shape)}")
    count = int(mask.sum())
    if count == 0:
        raise ValueError("no tokens to compare (mask is empty)")
    delta = (megatron - engine)[mask]
    finite = torch.isfinite(delta)
    abs_diff = torch.where(finite, delta.abs(), torch.full_like(delta, math.inf))
    ratio_err = torch.where(finite, delta.exp().sub(1).abs(), torch.full_like(delta, math.inf))
    metrics = {
        f"{prefix}logprob_abs_diff_mean": abs_diff.mean().item(),
        f"{prefix}logprob_abs_diff_max": abs_diff.max().item(),
        f"{prefix}prob_ratio_error_mean": ratio_err.mean().item(),
        f"{prefix}prob_ratio_error_max": ratio_err.max().item(),
        f"{prefix}logprob_tokens": float(count),
    }
    mean, worst = (
        metrics[f"{prefix}logprob_abs_diff_mean"],
        metrics[f"{prefix}logprob_abs_diff_max"],
    )
    problems = []
    if raise_if_mean_above is not None and not mean <= raise_if_mean_above:
        problems.append(f"mean |diff| {mean:.3e} > {raise_if_mean_above:.1e}")
    if raise_if_max_above is not None and not worst <= raise_if_max_above:
        problems.append(f"max |diff| {worst:.3e} > {raise_if_max_above:.1e}")
    if problems:
        raise LogprobGapError(
            f"rollout engine and Megatron log-probs disagree over {count} tokens: "
            f"{'; '.join(problems)} (a wrong weight sync, stale engine cache or mismatched "
            "temperature / vocabulary masking)",
            metrics,
        )
    return metrics
