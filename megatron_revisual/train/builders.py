"""The production training objects around a built model: Megatron DDP and the Megatron
optimizer with its LR / weight-decay schedule, from a `RunConfig`. Used by the staged runner
(`train.stages`), the smoke run (`train.smoke`), the GPU check and the tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_revisual.config.schema import OptimConfig, RunConfig
from megatron_revisual.models.common import TORCH_DTYPES
from megatron_revisual.parallel.chunks import model_chunks as as_chunks

__all__ = ["build_optimizer", "ddp_config", "params_gathered", "wrap_ddp"]


def wrap_ddp(cfg: RunConfig, model: torch.nn.Module) -> DistributedDataParallel:
    """Megatron DDP around `model` (fp32 gradient reduction; buckets for the distributed
    optimizer when configured), with the model config's grad-finalize and no-sync hooks set."""
    config = model.config
    ddp = DistributedDataParallel(config, ddp_config(cfg), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    if ddp.ddp_config.overlap_grad_reduce:
        # the pipeline schedules start the last micro-batch's reduction as soon as they can
        config.grad_sync_func = ddp.start_grad_sync
        vision = getattr(model, "vision_model", None)
        if vision is not None and any(p.requires_grad for p in vision.parameters()):
            model.idle_vision_pass = True  # every micro-batch gives the vision tower gradients
    return ddp


def ddp_config(cfg: RunConfig) -> DistributedDataParallelConfig:
    p = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        bucket_size=p.ddp_bucket_size,
    )


@contextlib.contextmanager
def params_gathered(model_chunks: torch.nn.Module | list[torch.nn.Module]) -> Iterator[None]:
    """With ``overlap_param_gather`` an optimizer step leaves each rank's parameters partly stale
    (only its own distributed-optimizer shard is new) until the next forward's pre-hooks gather
    them. Whatever reads the parameters outside a forward (a checkpoint save, the weight sync
    into the rollout engines, an HF export) runs inside this: the gather is forced first, and
    the hooks are back afterwards. Without overlap it does nothing."""
    chunks = as_chunks(model_chunks)
    overlapped = [c for c in chunks if getattr(getattr(c, "ddp_config", None), "overlap_param_gather", False)]
    for chunk in overlapped:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in overlapped:
            chunk.enable_forward_pre_hook()


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
