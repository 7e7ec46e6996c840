"""A short Megatron-Core training run of our Qwen2.5-VL on text: the demo's proof that the model,
the parallel stack, the Megatron optimizer and the LR schedule work together from a `RunConfig`.

Runs inside ranks already set up by `megatron_revisual.parallel` (see `smoke_train_rank`).
The staged runner (`train.stages`) builds its DDP wrapper and optimizer with the same
`wrap_ddp` / `build_optimizer`.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_revisual.config.schema import OptimConfig, RunConfig
from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
from megatron_revisual.models.qwen25_vl.provider import TORCH_DTYPES, build_qwen25_vl
from megatron_revisual.parallel.device import all_reduce, compute_device, to_device


def wrap_ddp(cfg: RunConfig, model: torch.nn.Module) -> DistributedDataParallel:
    """Megatron DDP around `model` (fp32 gradient reduction; buckets for the distributed
    optimizer when configured), with the model config's grad-finalize and no-sync hooks set."""
    config = model.config
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer
        ),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(cfg: RunConfig, model_chunks: list[DistributedDataParallel], *,
                    optim: OptimConfig | None = None, decay_steps: int | None = None):
    """Megatron optimizer (distributed when configured) and its LR/WD schedule, from `optim`
    (default cfg.optim) decaying over `decay_steps` (default cfg.train.train_iters)."""
    o = optim or cfg.optim
    decay = cfg.train.train_iters if decay_steps is None else decay_steps
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=o.optimizer,
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=cfg.model.params_dtype == "bf16",
            fp16=cfg.model.params_dtype == "fp16",
            params_dtype=TORCH_DTYPES[cfg.model.params_dtype],
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        model_chunks,
    )
    sched = OptimizerParamScheduler(
        opt,
        init_lr=0.0 if o.lr_warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=decay,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )
    return opt, sched


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
    model = build_qwen25_vl(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
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
