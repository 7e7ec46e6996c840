"""Cold-start SFT steps for `train.stages.StageRunner`.

A step takes `global_batch_size` conversations in the resumable sampler's order; DP rank r
formats every dp-th of them (`data.sft.SFTFormatter`: chat template, loss on assistant tokens,
images through the processor), packs them into rows of at most `max_length` tokens (THD, each
conversation its own attention segment) and runs Megatron's schedule over the rows as
gradient-accumulation micro-batches. The loss is the mean token NLL over every target token of
the step on all DP ranks, so it does not depend on how the step is cut into rows or ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core import parallel_state as ps

from megatron_revisual.data.datasets import PromptLoader
from megatron_revisual.data.packing import pack_sequences
from megatron_revisual.data.sft import (
    SFTFormatter,
    load_sft_set,
    load_tokenizer_and_processor,
    pack_groups,
)
from megatron_revisual.models.registry import model_family
from megatron_revisual.parallel.chunks import model_chunks
from megatron_revisual.parallel.device import all_reduce
from megatron_revisual.train.schedule import (
    family_of,
    from_last_stage,
    real_vocab_size,
    row_log_probs_and_entropy,
    run_packed_schedule,
    step_if_finite,
)
from megatron_revisual.train.stage_common import (
    StageContext,
    dp_info,
    row_multiple,
    skipped_report,
)

__all__ = ["SFTLoop", "sft_update"]


@dataclasses.dataclass(frozen=True)
class _Row:
    """One packed row as `run_packed_schedule` takes it (a dataclass, so `to_device` moves it)."""

    packed: Any


class SFTLoop:
    updates_per_step = 1

    warmup_steps: int | None

    def __init__(self, ctx: StageContext) -> None:
        self.cfg, self.stage = ctx.cfg, ctx.stage_cfg
        stage_cfg, hf_dir = ctx.stage_cfg, ctx.start_hf
        vision = self.cfg.model.vision is not None
        self.tokenizer, self.processor = load_tokenizer_and_processor(hf_dir, vision)
        self.dataset = load_sft_set(stage_cfg, self.tokenizer)
        self.loader = PromptLoader(self.dataset, stage_cfg.global_batch_size, seed=self.cfg.train.seed)
        self.formatter = SFTFormatter(self.tokenizer, max_length=stage_cfg.max_length, processor=self.processor)
        per_epoch = self.loader.sampler.batches_per_epoch
        self.total_steps = stage_cfg.train_iters or stage_cfg.epochs * per_epoch
        self.warmup_steps = round(stage_cfg.lr_warmup_fraction * self.total_steps)
        self.mrope = model_family(self.cfg.model).position_config(self.cfg.model)

    def attach(self, ddp, optimizer, scheduler) -> None:
        self.model, self.optimizer, self.scheduler = ddp, optimizer, scheduler

    def start(self, resumed_at: int) -> None:
        pass

    def describe(self) -> str:
        return (f"{len(self.dataset)} conversations, {self.stage.global_batch_size} per step, "
                f"{self.loader.sampler.batches_per_epoch} steps per epoch")

    def data_report(self) -> dict[str, int]:
        return {"data/usable_rows": len(self.dataset), **skipped_report("data/skipped", self.dataset.skipped)}

    def data_state(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "formatter_counts": dict(self.formatter.counts)}

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.formatter.counts.update(state.get("formatter_counts", {}))

    def schedule_state(self, stage_step: int) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    def hand_over(self) -> None:
        pass

    def validation_due(self, stage_step: int) -> bool:
        return False

    def validate(self) -> dict[str, float]:
        return {}

    def step(self, stage_step: int, global_step: int) -> dict[str, Any]:
        dp, dp_rank = dp_info()
        records = self.loader.next_batch()
        examples = [e for r in records[dp_rank::dp] if (e := self.formatter(r)) is not None]
        counts = torch.tensor([len(examples), sum(e.num_target_tokens for e in examples)], dtype=torch.float64)
        if ps.get_data_parallel_world_size() > 1:
            counts = all_reduce(counts, group=ps.get_data_parallel_group())
        skipped = {f"sft/{k}": v for k, v in sorted(self.formatter.counts.items())}
        tokens = float(counts[1])
        if tokens == 0:  # nothing to train on anywhere (a DP rank without rows runs filler rows)
            return {"skipped_step": 1.0, **skipped}
        rows = [
            _Row(pack_sequences([examples[i].to_sample() for i in group], config=self.mrope,
                                pad_to_multiple_of=row_multiple(self.cfg),
                                cp_size=self.cfg.parallel.context_parallel_size,
                                pad_token_id=self.tokenizer.pad_token_id or 0))
            for group in pack_groups([e.num_tokens for e in examples], self.stage.max_length)
        ]
        total, ok, grad_norm, lr = sft_update(self.model, self.optimizer, self.scheduler, rows, tokens=tokens)
        return {
            "loss": total / tokens,
            "grad_norm": grad_norm,
            "lr": lr,
            "sft/sequences": float(counts[0]),
            "sft/target_tokens": tokens,
            "sft/rows": float(len(rows)),
            "skipped_non_finite": float(not ok),
            **skipped,
        }


def sft_update(model: Any, optimizer: Any, scheduler: Any | None, rows: list[Any], *,
               tokens: float) -> tuple[float, bool, float, float]:
    """One optimizer step of the mean token NLL over `tokens` target tokens (the whole step, all
    DP ranks), this rank's share given as packed `rows` (anything with a `.packed` PackedBatch),
    run as gradient-accumulation micro-batches. Returns (the step's summed NLL over all DP
    ranks, finite, grad_norm, lr), the same on every rank."""
    dp = ps.get_data_parallel_world_size()
    vocab, family = real_vocab_size(model_chunks(model)[0]), family_of(model_chunks(model)[0])

    def loss_func(row: Any, logits: torch.Tensor):
        lp, _ = row_log_probs_and_entropy(logits, row.packed, vocab, 1.0, family=family)
        nll = -(lp.float() * row.packed.loss_mask).sum()
        return nll / tokens, {"nll": nll.detach().double()}

    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    out = run_packed_schedule([model], rows, loss_func, forward_only=False)
    lr = float(optimizer.param_groups[0]["lr"])
    ok, _, grad_norm = step_if_finite([model], optimizer, scheduler)
    total = torch.zeros(1, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        total[0] = sum(float(o["nll"]) for o in out)
        if dp > 1:
            total = all_reduce(total, group=ps.get_data_parallel_group())
    total = from_last_stage([total])[0]
    return float(total[0]), ok, grad_norm, lr
