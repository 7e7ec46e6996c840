"""A short Megatron-Core training run of our Qwen2.5-VL on text: the demo's proof that the model,
the parallel stack, the Megatron optimizer and the LR schedule work together from a `RunConfig`.

Runs inside ranks already set up by `megatron_revisual.parallel` (see `smoke_train_rank`).
Its DDP wrapper and optimizer come from `train.builders`, as the staged runner's do.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_revisual.config.schema import RunConfig
from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
from megatron_revisual.models.registry import model_family
from megatron_revisual.parallel.device import all_reduce, compute_device, to_device
from megatron_revisual.train.builders import build_optimizer, wrap_ddp


def _windows(tokens: torch.Tensor, seq_length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random windows of seq_length + 1 tokens (inputs plus shifted labels)."""
    starts = torch.randint(0, len(tokens) - seq_length - 1, (count,), generator=generator)
    return torch.stack([tokens[s : s + seq_length + 1] for s in starts.tolist()])


def smoke_train_rank(cfg: RunConfig, token_ids: list[int]) -> list[dict[str, float]]:
    """Train cfg.train.train_iters steps on windows of `token_ids`, starting from
    model.hf_path's weights when set; per-step metrics (every rank
    returns the same list: losses are broadcast from the last pipeline stage)."""
    t = cfg.train
    tokens = torch.tensor(token_ids, dtype=torch.long)
    if len(tokens) <= t.seq_length + 1:
        raise ValueError(f"smoke data has {len(tokens)} tokens; need more than train.seq_length+1={t.seq_length + 1}")
    model = model_family(cfg.model).build(cfg, pre_process=ps.is_pipeline_first_stage(),
                                          post_process=ps.is_pipeline_last_stage())
    if cfg.model.hf_path:
        load_hf_weights(
            model,
            SafetensorsReader(cfg.model.hf_path),
            cfg.model,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
        )
    model = wrap_ddp(cfg, model)
    optimizer, scheduler = build_optimizer(cfg, [model])

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    # Same generator on every rank: each DP rank takes its own slice of the global batch.
    generator = torch.Generator().manual_seed(t.seed)
    position_ids = torch.arange(t.seq_length, device=compute_device()).unsqueeze(0).expand(t.micro_batch_size, -1)
    if cfg.model.vision is not None:  # text tokens: the same position on all three M-RoPE axes
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        output = model(batch[:, :-1], position_ids, attention_mask=None, labels=batch[:, 1:])

        def loss_func(per_token_loss: torch.Tensor):
            loss = per_token_loss.float().mean()
            # clone: the schedule divides the returned loss in place by the micro-batch count.
            return loss, {"lm_loss": loss.detach().clone()}

        return output, partial(loss_func)

    history = []
    for step in range(t.train_iters):
        batch = _windows(tokens, t.seq_length, t.global_batch_size, generator)
        local = batch.view(dp, num_micro, t.micro_batch_size, -1)[dp_rank]
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(local),
            model=[model],
            num_microbatches=num_micro,
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(increment=1)
        loss = torch.zeros(1, device=compute_device())
        if ps.is_pipeline_last_stage():
            loss = torch.stack([x["lm_loss"] for x in losses]).mean().reshape(1)
            loss = all_reduce(loss, group=ps.get_data_parallel_group()) / dp
        # Every rank reports the same numbers: sum over the pipeline (only the last stage is non-zero).
        loss = all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
        history.append({"step": step + 1, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr})
    return history
