"""Megatron's pipeline schedule over packed rows and the labels' log-probabilities from its logits,
shared by the SFT and GRPO steps.

    out = run_packed_schedule(model, rows, loss_func, forward_only=False)   # rows: anything with
    ok, _, grad_norm = step_if_finite(model, optimizer, scheduler)          # a `.packed` row

Every DP rank runs the same number of micro-batches in every schedule call. A collective inside
a forward or backward pass (Transformer Engine's FP8 amax all-reduce over TP x DP x CP at every
autocast exit with delayed scaling; CP attention; DDP's bucketed reductions) is issued once per
micro-batch, so a rank with one more micro-batch than its peers issues a collective they never
join: NCCL hangs until its timeout. Packing gives DP ranks different counts (each packs its own
rows), so the count is agreed over the DP x CP group (the largest) and a rank with fewer runs
filler rows: the smallest row the layout allows, no loss token, its loss 0 x the logits. Fillers
add nothing to the loss, the gradients or the returned metrics; only their time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_revisual.data.packing import PackedBatch, Sample, pack_sequences, row_length_multiple
from megatron_revisual.models.registry import model_family
from megatron_revisual.parallel.chunks import inner_model, model_chunks
from megatron_revisual.parallel.device import all_reduce, compute_device, to_device
from megatron_revisual.rl.logprobs import vocab_parallel_log_probs_and_entropy

__all__ = [
    "FillerRow",
    "agreed_micro_batch_count",
    "family_of",
    "filler_row",
    "from_last_stage",
    "grads_are_finite",
    "real_vocab_size",
    "row_log_probs_and_entropy",
    "run_packed_schedule",
    "step_if_finite",
    "token_log_probs_and_entropy",
]


def family_of(model: torch.nn.Module) -> Any:
    """The `models.registry.ModelFamily` of a (wrapped) model chunk."""
    return model_family(inner_model(model).model_cfg)


def real_vocab_size(model: torch.nn.Module) -> int:
    """The tokenizer's vocabulary (the logits carry more columns: padded for TP)."""
    return int(inner_model(model).model_cfg.vocab_size)


@dataclasses.dataclass(frozen=True)
class FillerRow:
    """A row run only so this rank's micro-batch count equals its DP peers' (module docstring)."""

    packed: PackedBatch


def filler_row(model: torch.nn.Module) -> FillerRow:
    """The smallest row `model`'s layout takes: one token, padded to the row multiple of its
    sequence / context parallelism and FP8 recipe (`data.packing.row_length_multiple`), on the
    host like every row (`run_packed_schedule` moves it)."""
    config = model.config
    recipe = getattr(config.fp8_recipe, "value", config.fp8_recipe) if config.fp8 else None
    multiple = row_length_multiple(tp=config.tensor_model_parallel_size, sequence_parallel=config.sequence_parallel,
                                   cp=config.context_parallel_size, fp8_recipe=recipe)
    packed = pack_sequences([Sample(input_ids=torch.zeros(1, dtype=torch.long))],
                            config=family_of(model).position_config(inner_model(model).model_cfg),
                            pad_to_multiple_of=multiple, cp_size=config.context_parallel_size, pad_token_id=0)
    return FillerRow(packed=packed)


def agreed_micro_batch_count(count: int) -> int:
    """The largest micro-batch count over this rank's DP x CP group (TP and PP ranks of a
    replica hold the same rows): the count every rank of the group runs."""
    group = ps.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) == 1:
        return count
    return int(all_reduce(torch.tensor([count], dtype=torch.int64), op=dist.ReduceOp.MAX, group=group)[0])


def run_packed_schedule(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    micro_batches: Sequence[Any],
    loss_func: Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]],
    *,
    forward_only: bool,
) -> list[dict[str, Any]]:
    """Megatron's forward(-backward) schedule over packed rows (anything with a `.packed`
    PackedBatch); the results of `loss_func(item, logits)` per row, in order, on the last
    pipeline stage (empty elsewhere).

    `loss_func` returns (this row's part of the step's loss, metrics): the loss of the step is the
    sum of the parts over this rank's rows and all DP ranks. Megatron divides each part by the
    micro-batch count and DDP averages the gradients over DP (x CP, which the schedule undoes
    itself by multiplying the loss by the CP size); both are undone here, so the gradient is the
    step loss's. Filler rows (module docstring) pad the count to the DP group's and are left out
    of the results. Each row is built on the host and moved to the compute device here, whole
    (tokens, labels, masks, RL tensors, pixels, cu_seqlens), as it enters the model; `loss_func`
    gets the moved one."""
    chunks = model_chunks(model)
    config = chunks[0].config
    real = len(micro_batches)
    count = agreed_micro_batch_count(real)
    if count == 0:
        return []
    rows = list(micro_batches) + [filler_row(chunks[0])] * (count - real)
    undo = count * ps.get_data_parallel_world_size()

    def forward_step(data_iterator, m):
        mb = to_device(next(data_iterator))
        p = mb.packed
        output = m(
            p.input_ids, p.position_ids, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
            pixel_values_videos=p.pixel_values_videos, video_grid_thw=p.video_grid_thw,
            packed_seq_params=p.packed_seq_params,
        )
        if isinstance(mb, FillerRow):
            # connected to the whole graph, so the backward (and its collectives) runs as for a row
            return output, lambda logits: (logits.sum() * 0.0, {})

        def scaled(logits):
            loss, metrics = loss_func(mb, logits)
            return loss * undo, metrics

        return output, scaled

    lengths = {int(mb.packed.input_ids.shape[1]) for mb in rows}
    # Rows of different lengths: the pipeline stages exchange shapes before each activation.
    saved = config.variable_seq_lengths
    config.variable_seq_lengths = saved or len(lengths) > 1
    try:
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(rows) for _ in chunks] if len(chunks) > 1 else iter(rows),
            model=chunks,
            num_microbatches=count,
            seq_length=max(lengths),
            micro_batch_size=1,
            forward_only=forward_only,
        )
    finally:
        config.variable_seq_lengths = saved
    return list(out[:real])


def from_last_stage(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Broadcast tensors that only the last pipeline stage holds (shapes known everywhere) to the
    whole pipeline group: the sum with zeros elsewhere (all on one device)."""
    if ps.get_pipeline_model_parallel_world_size() == 1 or not tensors:
        return tensors
    flat = all_reduce(torch.cat([t.reshape(-1) for t in tensors]), group=ps.get_pipeline_model_parallel_group())
    return list(flat.split([t.numel() for t in tensors]))


def grads_are_finite(model: torch.nn.Module | Sequence[torch.nn.Module]) -> bool:
    """Whether every gradient on every rank is finite (collective over the world). Reads
    Megatron DDP's `main_grad` buffers (after the schedule's DP reduction) or `.grad`, on their
    device, and reads back one flag."""
    flags = []
    for chunk in model_chunks(model):
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is not None:
                flags.append(torch.isfinite(g).all().logical_not())
    bad = torch.stack(flags).any().float().reshape(1) if flags else torch.zeros(1, device=compute_device())
    if dist.is_initialized():
        bad = all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def step_if_finite(model: torch.nn.Module | Sequence[torch.nn.Module], optimizer: Any,
                   scheduler: Any | None = None) -> tuple[bool, bool, float]:
    """The optimizer (and scheduler) step after a backward pass, unless some gradient on some
    rank is not finite: a NaN/inf would poison Adam's moments, so the gradients are dropped
    instead and the caller logs it. Returns (finite, update_successful, grad_norm)."""
    if not grads_are_finite(model):
        optimizer.zero_grad()
        return False, False, float("nan")
    update_successful, grad_norm, _ = optimizer.step()
    if scheduler is not None:
        scheduler.step(increment=1)
    return True, bool(update_successful), float(grad_norm) if grad_norm is not None else float("nan")


# ---------------------------------------------------------------------------------------------
# Log-probabilities of the labels from the logits (the SFT loss, the GRPO passes)


def token_log_probs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocab-parallel log p(label) and entropy; the TP-padding columns (global index >=
    vocab_size) are -inf so they take no probability (their count differs between TP sizes)."""
    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    if start + local > vocab_size:
        padding = torch.arange(start, start + local, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
    # the temperature divides after the promotion to float32, inside
    return vocab_parallel_log_probs_and_entropy(logits, labels, vocab_start_index=start, temperature=temperature)


def row_log_probs_and_entropy(
    logits: torch.Tensor, packed: Any, vocab_size: int, temperature: float, *, family: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_log_probs_and_entropy` over the whole packed row [1, T], from the model's logits.

    Under CP the logits cover this rank's tokens only (`cp_token_indices` order): the log-probs
    and entropies of its tokens are computed here, then all-gathered over the CP group into row
    order, so the loss and its metrics (per-sequence aggregations, PAD, KL) see whole sequences,
    exactly as at CP 1. Every CP rank then computes the same loss; autograd hands each rank the
    gradient of its own tokens (DDP sums the CP ranks' gradients with the DP ranks').
    `family`: the model's family (`family_of`), which owns the CP split of a row."""
    if ps.get_context_parallel_world_size() == 1:
        return token_log_probs_and_entropy(logits, packed.labels, vocab_size, temperature)
    from megatron_revisual.parallel.context_parallel import gather_full_row

    params = packed.packed_seq_params
    labels = family.split_for_context_parallel(packed.labels, params)
    lp, entropy = token_log_probs_and_entropy(logits, labels, vocab_size, temperature)
    # one gather for both
    both = gather_full_row(torch.stack([lp, entropy]), family.segment_bounds(params), ps.get_context_parallel_group())
    return both[0], both[1]
