"""Context-parallel (CP) data split: which tokens each CP rank holds, and the way back.

The load-balanced rule of Megatron-Core and Transformer Engine: with causal attention a token
late in a sequence attends to more keys than an early one, so a sequence of length L (a multiple
of 2 * cp) is cut into 2 * cp equal chunks and CP rank r holds chunks r and 2 * cp - 1 - r, in
that order. Every rank then does the same attention work.

- Packed (THD) rows: the rule applies to every sequence of the row separately, sequences kept
  in packing order -- Transformer Engine's `thd_get_partitioned_indices(cu_seqlens_padded,
  total, cp, rank)` as Megatron's `get_thd_batch_on_this_cp_rank` calls it. Each sequence is
  first padded to a multiple of 2 * cp (`pad_for_cp`, `pad_packed`); attention is told both the
  true and the padded `cu_seqlens` so the padding is never attended.
- Padded (BSHD) batches: one sequence of length s per row, i.e. the THD rule with
  `cu_seqlens = [0, s]` -- Megatron's `get_batch_on_this_cp_rank` (megatron/core/utils.py).

cp_size = 1 is the identity and needs no padding, as Megatron skips the split then.

M-RoPE position ids [3, 1, T] are split along their last dimension with the same indices as the
tokens (`seq_dim=-1`), after the vision embeddings have been scattered into the full sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_cp(cp_size: int, cp_rank: int | None = None) -> None:
    if cp_size < 1:
        raise ValueError(f"cp_size={cp_size} must be >= 1")
    if cp_rank is not None and not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} outside range(cp_size={cp_size})")


def _as_cu_seqlens(cu_seqlens: torch.Tensor | Sequence[int]) -> torch.Tensor:
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long).flatten()
    if cu.numel() < 1 or cu[0] != 0 or (cu[1:] < cu[:-1]).any():
        raise ValueError(f"cu_seqlens={cu.tolist()} must start at 0 and not decrease")
    return cu


def pad_for_cp(
    lengths: torch.Tensor | Sequence[int], cp_size: int, *, tp_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence lengths padded for the CP split, and the padded `cu_seqlens`.

    Each length is rounded up to a multiple of 2 * cp_size (1 when cp_size is 1). With sequence
    parallelism pass `tp_size`: the multiple becomes 2 * cp_size * tp_size (tp_size when
    cp_size is 1), so each CP rank's tokens also divide evenly over its TP ranks.

    Returns:
        padded lengths [n] int64 and cu_seqlens_padded [n + 1] int32 (Transformer Engine's dtype).
    """
    _check_cp(cp_size)
    if tp_size < 1:
        raise ValueError(f"tp_size={tp_size} must be >= 1")
    multiple = (2 * cp_size if cp_size > 1 else 1) * tp_size
    lens = torch.as_tensor(lengths, dtype=torch.long).flatten()
    if (lens < 0).any():
        raise ValueError(f"negative sequence length in {lens.tolist()}")
    padded = (lens + multiple - 1) // multiple * multiple
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    cu[1:] = padded.cumsum(0)
    return padded, cu


def padded_token_index(
    cu_seqlens: torch.Tensor | Sequence[int], cu_seqlens_padded: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """For each token of the unpadded packed row, its index in the padded row ([total] int64)."""
    cu, cu_pad = _as_cu_seqlens(cu_seqlens), _as_cu_seqlens(cu_seqlens_padded)
    lens, lens_pad = cu.diff(), cu_pad.diff()
    if lens.shape != lens_pad.shape or (lens_pad < lens).any():
        raise ValueError(
            f"cu_seqlens_padded={cu_pad.tolist()} does not pad cu_seqlens={cu.tolist()}"
        )
    # token k of sequence i moves by the padding added before sequence i
    shift = (cu_pad[:-1] - cu[:-1]).repeat_interleave(lens)
    return torch.arange(int(cu[-1])) + shift


def pad_packed(
    tensor: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    cp_size: int,
    seq_dim: int,
    *,
    value: float | int = 0,
    tp_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert padding after every sequence of a packed tensor so the CP split can apply.

    Returns the padded tensor (`value` in the new slots) and cu_seqlens_padded (int32).
    """
    cu = _as_cu_seqlens(cu_seqlens)
    dim = seq_dim % tensor.dim()
    if tensor.shape[dim] != int(cu[-1]):
        raise ValueError(
            f"tensor has {tensor.shape[dim]} tokens on dim {seq_dim}, cu_seqlens ends at {int(cu[-1])}"
        )
    _, cu_pad = pad_for_cp(cu.diff(), cp_size, tp_size=tp_size)
    shape = list(tensor.shape)
    shape[dim] = int(cu_pad[-1])
    out = tensor.new_full(shape, value)
    out.index_copy_(dim, padded_token_index(cu, cu_pad).to(tensor.device), tensor)
    return out, cu_pad


def unpad_packed(
    tensor: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    cu_seqlens_padded: torch.Tensor | Sequence[int],
    seq_dim: int,
) -> torch.Tensor:
    """Drop the padding `pad_packed` inserted (inverse of it)."""
    index = padded_token_index(cu_seqlens, cu_seqlens_padded).to(tensor.device)
    return tensor.index_select(seq_dim % tensor.dim(), index)


def cp_rank_indices(
    cu_seqlens: torch.Tensor | Sequence[int], cp_size: int, cp_rank: int
) -> torch.Tensor:
    """Global token indices [total / cp_size] (int64) that CP rank `cp_rank` holds, in order.

    For every sequence [s, s + L) of the (padded) packed row, with c = L / (2 * cp_size): the
    tokens of chunk `cp_rank`, then those of chunk `2 * cp_size - 1 - cp_rank`.
    """
    _check_cp(cp_size, cp_rank)
    cu = _as_cu_seqlens(cu_seqlens)
    if cp_size == 1:
        return torch.arange(int(cu[-1]))
    lens = cu.diff()
    bad = (lens % (2 * cp_size)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"sequences {bad} have lengths {lens[bad].tolist()}, not multiples of "
            f"2 * cp_size = {2 * cp_size}; pad them first (pad_for_cp / pad_packed)"
        )
    chunk = lens // (2 * cp_size)
    starts = torch.stack(
        [cu[:-1] + cp_rank * chunk, cu[:-1] + (2 * cp_size - 1 - cp_rank) * chunk], dim=1
    ).flatten()  # [seq0 first, seq0 second, seq1 first, ...]
    run_lens = chunk.repeat_interleave(2)
    # index within each run = global output index - where the run begins in the output
    run_begin = (run_lens.cumsum(0) - run_lens).repeat_interleave(run_lens)
    return starts.repeat_interleave(run_lens) + torch.arange(int(run_lens.sum())) - run_begin


def cp_split(
    tensor: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    cp_size: int,
    cp_rank: int,
    seq_dim: int,
) -> torch.Tensor:
    """This CP rank's tokens of a packed tensor (padded layout), along `seq_dim`."""
    index = cp_rank_indices(cu_seqlens, cp_size, cp_rank)
    dim = seq_dim % tensor.dim()
    total = int(_as_cu_seqlens(cu_seqlens)[-1])
    if tensor.shape[dim] != total:
        raise ValueError(
            f"tensor has {tensor.shape[dim]} tokens on dim {seq_dim}, cu_seqlens ends at {total}"
        )
    return tensor.index_select(dim, index.to(tensor.device))


def cp_unsplit(
    parts: Sequence[torch.Tensor],
    cu_seqlens: torch.Tensor | Sequence[int],
    cp_size: int,
    seq_dim: int,
) -> torch.Tensor:
    """The full packed tensor from every CP rank's part (rank order, e.g. an all-gather)."""
    _check_cp(cp_size)
    if len(parts) != cp_size:
        raise ValueError(f"got {len(parts)} parts for cp_size={cp_size}")
    dim = seq_dim % parts[0].dim()
    shape = list(parts[0].shape)
    shape[dim] = int(_as_cu_seqlens(cu_seqlens)[-1])
    out = parts[0].new_empty(shape)
    for rank, part in enumerate(parts):
        index = cp_rank_indices(cu_seqlens, cp_size, rank).to(part.device)
        if part.shape[dim] != index.numel():
            raise ValueError(
                f"part of CP rank {rank} has {part.shape[dim]} tokens on dim {seq_dim}, "
                f"expected {index.numel()}"
            )
        out.index_copy_(dim, index, part)
    return out


def cp_split_bshd(
    tensor: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1
) -> torch.Tensor:
    """This CP rank's slice of a padded batch whose dim `seq_dim` is the sequence.

    Megatron's `get_batch_on_this_cp_rank` semantics: seq_dim 1 for tokens, labels, loss mask and
    [b, s] position ids, 2 for a [b, 1, s, s] attention mask, and -1 for M-RoPE [3, b, s]
    position ids. The sequence length must be a multiple of 2 * cp_size.
    """
    return cp_split(tensor, [0, tensor.shape[seq_dim]], cp_size, cp_rank, seq_dim)


def cp_unsplit_bshd(parts: Sequence[torch.Tensor], cp_size: int, seq_dim: int = 1) -> torch.Tensor:
    """Inverse of `cp_split_bshd` given every CP rank's part in rank order."""
    total = sum(p.shape[seq_dim] for p in parts)
    return cp_unsplit(parts, [0, total], cp_size, seq_dim)


# --- collectives over the CP group with autograd -----------------------------------------------
def _gather_parts(tensor: torch.Tensor, group) -> list[torch.Tensor]:  # noqa: ANN001
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


class _AllGatherSummedBackward(torch.autograd.Function):
    """Concatenate every CP rank's equal-shaped tensor along dim 0. Backward: each rank's part
    gets the sum of every rank's gradient for it (the gathered tensor feeds different work on
    each rank, e.g. the keys and values every rank's queries attend to)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
        import torch.distributed as dist

        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), tensor.shape[0]
        return torch.cat(_gather_parts(tensor, group), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


class _AllGatherReplicatedBackward(torch.autograd.Function):
    """Concatenate every CP rank's equal-shaped tensor along dim 0, for work that every CP rank
    then repeats identically (a loss over the whole row). Backward: this rank's slice of the
    gradient, no communication (every rank holds the same gradient)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(group), tensor.shape[0]
        return torch.cat(_gather_parts(tensor, group), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def all_gather_cp(tensor: torch.Tensor, group, *, replicated: bool) -> torch.Tensor:  # noqa: ANN001
    """Every CP rank's `tensor` (equal shapes) concatenated along dim 0 in rank order, with
    autograd. `replicated`: what follows runs identically on every rank (the gradient is taken
    from this rank's slice); otherwise each rank's gradient contributions are summed."""
    fn = _AllGatherReplicatedBackward if replicated else _AllGatherSummedBackward
    return fn.apply(tensor, group)


def gather_full_row(local: torch.Tensor, cu_seqlens: torch.Tensor | Sequence[int], group) -> torch.Tensor:  # noqa: ANN001
    """The full packed row [..., T] of a per-token tensor [..., T / cp] that every CP rank holds
    for its own tokens (`cp_rank_indices` order), for work every CP rank then repeats on the
    whole row (log-probs into the GRPO / SFT loss); autograd takes each rank's slice back."""
    import torch.distributed as dist

    gathered = all_gather_cp(local.movedim(-1, 0), group, replicated=True)
    parts = gathered.chunk(dist.get_world_size(group))
    return cp_unsplit(parts, cu_seqlens, len(parts), seq_dim=0).movedim(0, -1)
