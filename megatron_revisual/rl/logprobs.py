"""Token log-probabilities and entropy from vocab-parallel logits, without gathering the vocab.

Under tensor parallelism Megatron's output layer leaves each rank with a contiguous shard
``z[..., v0:v0 + V/tp]`` of the logits. Gathering them would cost ``tokens x V`` floats per rank
(152k-wide for Qwen2.5-VL), so the softmax statistics are reduced instead, each an all-reduce
over the TP group of one number per token:

    m   = max_v z_v                                  (all-reduce MAX)
    S   = sum_v exp(z_v - m)                         (all-reduce SUM)
    z_y = the target's logit, 0 on ranks without it  (all-reduce SUM)
    W   = sum_v exp(z_v - m) (z_v - m)               (all-reduce SUM)

    log p(y) = z_y - m - log S
    H        = -sum_v p_v log p_v = log S - W / S

Backward needs no communication: with ``g_y``, ``g_H`` the (TP-replicated) output gradients and
``p_v = exp(z_v - m) / S`` computed on the local shard,

    d/dz_v = g_y (1[v = y] - p_v) - g_H p_v ((z_v - m) - W / S)

which is exactly the slice of the full-vocabulary gradient. This is the same decomposition as
Megatron's ``vocab_parallel_cross_entropy``, extended with the entropy term the RL loss needs.
Statistics are computed in at least float32 whatever the logits' dtype; the gradient is returned in the
logits' dtype. ``temperature`` divides the logits after that promotion (the released code divides
them in place, ``logits.div_(temperature)``, so training log-probs match the rollout's): dividing
bf16 logits first would round z / T to bf16 again, an error of up to 2^-9 of each logit. Columns of
the TP-padded vocabulary that are not real tokens should be set to -inf by the caller (they then
get probability 0 and gradient 0); left as they are, they take probability mass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "vocab_parallel_entropy",
    "vocab_parallel_log_probs",
    "vocab_parallel_log_probs_and_entropy",
]

_Group = Any  # torch.distributed.ProcessGroup; Any so that None and the default group type-check


def _resolve_group(group: _Group | None) -> _Group | None:
    """The explicit group, else Megatron's TP group, else None (a single process, no collectives)."""
    if group is not None:
        return group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    if tp_group is None:
        # Silently treating a distributed job as TP=1 would give wrong log-probs on every rank.
        raise RuntimeError(
            "torch.distributed is initialized but Megatron's tensor-parallel group is not; "
            "pass group= explicitly (e.g. dist.group.WORLD when every rank holds one vocab shard)"
        )
    return tp_group


def _p_times_z(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``p * z`` with 0 where ``p == 0``: masked (-inf) vocabulary padding has p = 0, z = -inf,
    and contributes nothing to the entropy instead of 0 * inf = NaN."""
    return torch.where(p > 0, p * z, torch.zeros_like(p))


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: _Group | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


# Tokens are processed in chunks of about this many logits, so the float32 temporaries of the
# statistics (the promoted logits, z - m, exp, p * z, the gradient's terms: ~8 of them) take
# ~8 x 4 x 2^24 B = 512 MiB at most, instead of ~8 times the whole [tokens, V / TP] (about 75 GB
# for a 32k-token row of Qwen2.5-VL's 152k vocabulary at TP 2).
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(local_vocab: int) -> int:
    """Tokens per chunk for a local vocabulary shard of `local_vocab` columns."""
    return max(1, CHUNK_ELEMENTS // max(1, local_vocab))


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """Forward and backward in chunks of `chunk_rows` tokens (module docstring for the maths);
    saves the logits themselves (no float32 copy) and four numbers per token. Every TP rank has
    the same tokens and shard width, so every rank runs the same number of chunk all-reduces."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        vocab_start: int,
        group: _Group | None,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        local_vocab = logits.shape[-1]
        rows = chunk_rows(local_vocab)
        local_target = targets - vocab_start
        owned = (local_target >= 0) & (local_target < local_vocab)
        safe_index = torch.where(owned, local_target, torch.zeros_like(local_target))
        flat_logits, flat_index, flat_owned = logits.reshape(-1, local_vocab), safe_index.reshape(-1), owned.reshape(-1)
        outputs = []
        for a in range(0, flat_logits.shape[0], rows):
            outputs.append(_chunk_statistics(flat_logits[a:a + rows], flat_index[a:a + rows],
                                             flat_owned[a:a + rows], group, temperature))
        m, log_sum_exp, mean_shifted, log_probs, entropy = (
            torch.cat(parts).reshape(targets.shape) for parts in zip(*outputs, strict=True)
        )
        ctx.save_for_backward(logits, m, log_sum_exp, mean_shifted, safe_index, owned)
        ctx.temperature = temperature
        # Unused outputs (e.g. entropy when only log-probs enter the loss) then arrive as None.
        ctx.set_materialize_grads(False)
        return log_probs, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        logits, m, log_sum_exp, mean_shifted, safe_index, owned = ctx.saved_tensors
        temperature = ctx.temperature
        local_vocab = logits.shape[-1]
        rows = chunk_rows(local_vocab)
        grad_out = torch.empty_like(logits)
        flat_grad = grad_out.view(-1, local_vocab)
        flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
        z_all, m, lse, mean = logits.reshape(-1, local_vocab), flat(m), flat(log_sum_exp), flat(mean_shifted)
        index, own, g_lp, g_h = flat(safe_index), flat(owned), flat(grad_log_probs), flat(grad_entropy)
        for a in range(0, z_all.shape[0], rows):
            b = a + rows
            z = _promoted(z_all[a:b], temperature)
            shifted = z - m[a:b].unsqueeze(-1)
            probs = (shifted - lse[a:b].unsqueeze(-1)).exp()
            grad = torch.zeros_like(shifted)
            if g_h is not None:
                centered = _p_times_z(probs, shifted - mean[a:b].unsqueeze(-1))
                grad -= g_h[a:b].to(grad.dtype).unsqueeze(-1) * centered
            if g_lp is not None:
                g = g_lp[a:b].to(grad.dtype)
                grad -= g.unsqueeze(-1) * probs
                # +g at the target column, on the rank that owns it only.
                grad.scatter_add_(-1, index[a:b].unsqueeze(-1), (g * own[a:b].to(g.dtype)).unsqueeze(-1))
            if temperature != 1.0:
                grad /= temperature  # d(z / T) / dz
            flat_grad[a:b] = grad.to(logits.dtype)
        return grad_out, None, None, None, None


def _promoted(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z = logits / temperature in at least float32: bf16 softmax statistics lose the log-prob
    differences PPO clips on, and the division happens after the promotion."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return z / temperature if temperature != 1.0 else z


def _chunk_statistics(
    logits: torch.Tensor, safe_index: torch.Tensor, owned: torch.Tensor, group: _Group | None,
    temperature: float,
) -> tuple[torch.Tensor, ...]:
    """(m, log S, E_p[z - m], log p(y), H) of a chunk of tokens [rows, V / TP], z = logits / T."""
    z = _promoted(logits, temperature)
    # The max only shifts for stability, so no gradient flows through it.
    m = z.max(dim=-1).values
    _all_reduce(m, dist.ReduceOp.MAX, group)
    shifted = z - m.unsqueeze(-1)
    exp = shifted.exp()
    target_logit = shifted.gather(-1, safe_index.unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))
    # One all-reduce for three per-token sums instead of three round trips.
    stats = torch.stack([exp.sum(dim=-1), target_logit, _p_times_z(exp, shifted).sum(dim=-1)])
    _all_reduce(stats, dist.ReduceOp.SUM, group)
    sum_exp, target_logit, weighted = stats.unbind(0)
    log_sum_exp = sum_exp.log()
    mean_shifted = weighted / sum_exp  # E_p[z - m]
    return m, log_sum_exp, mean_shifted, target_logit - log_sum_exp, log_sum_exp - mean_shifted


def vocab_parallel_log_probs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    group: _Group | None = None,
    vocab_start_index: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(targets), entropy)`` of ``softmax(logits / temperature)``, both float32 (float64
    for float64 logits) of shape ``targets.shape``, differentiable w.r.t. ``logits``.

    ``logits``: this rank's shard ``[..., V_local]``; ``targets``: global token ids ``[...]`` in
    ``[0, V_total)``. ``group`` defaults to Megatron's tensor-parallel group (no collectives when
    torch.distributed is not initialized). ``vocab_start_index`` defaults to
    ``rank_in_group * V_local``, Megatron's even split of the (padded) vocabulary.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} plus a vocab dim"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    group = _resolve_group(group)
    if vocab_start_index is None:
        rank = dist.get_rank(group) if group is not None else 0
        vocab_start_index = rank * logits.shape[-1]
    return _VocabParallelLogProbEntropy.apply(logits, targets.long(), int(vocab_start_index), group,
                                              float(temperature))


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    group: _Group | None = None,
    vocab_start_index: int | None = None,
) -> torch.Tensor:
    """``log p(targets)`` from vocab-parallel logits; see ``vocab_parallel_log_probs_and_entropy``."""
    return vocab_parallel_log_probs_and_entropy(
        logits, targets, group=group, vocab_start_index=vocab_start_index
    )[0]


def vocab_parallel_entropy(
    logits: torch.Tensor,
    *,
    group: _Group | None = None,
) -> torch.Tensor:
    """Entropy of the softmax over the full (sharded) vocabulary, per position."""
    dummy = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return vocab_parallel_log_probs_and_entropy(logits, dummy, group=group, vocab_start_index=0)[1]
