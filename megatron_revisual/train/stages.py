"""The stages of `revisual train` (see `train.runner`): cold-start SFT and GRPO with PAD.

`StageRunner.run_stage(name)` builds the policy for the stage (weights from the previous
stage's final checkpoint, or `model.hf_path`), a fresh Megatron optimizer and LR schedule, and
steps a `SFTLoop` or `GRPOLoop`; it checkpoints every `checkpoint.every` global steps and on a
stop request, and exports + checkpoints at the stage's end. Everything that decides a step's
numbers (data order, rollout seeds, PAD draws) is a function of (train.seed, global step) or
lives in the checkpoint, so a resumed run repeats an uninterrupted one exactly.

GRPO step (every rank runs the same code; rank 0 owns the rollout engine and the rewards):
  prompts (rollout_batch_size) -> engine samples n each (seeded) -> broadcast -> rewards
  (rank 0, broadcast) -> group advantages -> PAD selection -> this DP rank's share, packed
  -> old log-probs (policy) and reference log-probs (frozen stage-start model, when kl_coef>0)
  -> ppo_epochs x mini-batches of global_batch_size prompts' worth of samples: `grpo_update`
  -> weights streamed into the engine (`convert.export.stream_hf_tensors`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_revisual.config.schema import OptimConfig, RunConfig, SFTStageConfig
from megatron_revisual.models.registry import model_family
from megatron_revisual.parallel.device import broadcast_object
from megatron_revisual.parallel.rng import rng_state
from megatron_revisual.train.checkpointing import (
    CHECKPOINT_FORMAT,
    AsyncSaves,
    checkpoint_root,
    current_layout,
    find_stage_end,
    restore_training_state,
    save_checkpoint,
    stop_file_path,
    training_state_dict,
)
from megatron_revisual.train.grpo_loop import GRPOLoop
from megatron_revisual.train.sft_loop import SFTLoop
from megatron_revisual.train.stage_common import EngineShelf, Stage, StageContext

__all__ = ["StageRunner", "weights_digest"]


def weights_digest(hf_dir: str | Path) -> str:
    """sha256 over an HF directory's tensors (name, dtype, shape, bytes; names sorted): equal
    for equal weights whatever the shard layout."""
    from safetensors import safe_open

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                where[name] = f
    h = hashlib.sha256()
    for name in sorted(where):
        with safe_open(str(where[name]), "pt") as st:
            t = st.get_tensor(name).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class StageRunner:
    def __init__(self, cfg: RunConfig, *, resume_state: dict[str, Any] | None, resume_dir: Path | None) -> None:
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.resume_state = resume_state
        self.resume_dir = resume_dir
        self.global_step = int(resume_state["global_step"]) if resume_state else 0
        self.ckpt_root = checkpoint_root(cfg)
        self.stop_file = stop_file_path(cfg.output_dir)
        self.out = Path(cfg.output_dir)
        self.final_export: Path | None = None
        self.async_saves = AsyncSaves() if cfg.checkpoint.async_save else None
        self.engines = EngineShelf()  # a GRPO stage's engines, kept for a like next stage
        # collective, called after every step with (stage, step); their metrics join the row
        self.step_hooks: list[Callable[[str, int], dict[str, float]]] = []
        self.log = None
        if self.rank == 0:
            from megatron_revisual.config import config_to_dict
            from megatron_revisual.train.metrics_log import MetricsLog

            lc = cfg.logging
            self.log = MetricsLog(
                cfg.output_dir, run_name=cfg.name, config=config_to_dict(cfg), use_wandb=lc.wandb,
                wandb_mode=lc.wandb_mode, wandb_project=lc.wandb_project, wandb_dir=lc.wandb_dir,
                wandb_run_id=(resume_state or {}).get("wandb_run_id"), progress_bar=lc.progress_bar,
                resume_step=self.global_step,
            )

    @property
    def final_digest(self) -> str | None:
        return weights_digest(self.final_export) if self.final_export else None

    def close(self) -> None:
        self.engines.close()
        if self.log is not None:
            self.log.close()

    # --- stage boundaries ------------------------------------------------------------------
    def _previous_stage(self, name: str) -> str | None:
        i = self.cfg.stages.index(name)
        return self.cfg.stages[i - 1] if i > 0 else None

    def _start_point(self, name: str) -> tuple[Path | None, Path]:
        """(checkpoint to load at the stage's start or None for model.hf_path, HF dir of those
        weights: what the rollout engine starts from)."""
        prev = self._previous_stage(name)
        if prev is None:
            return None, Path(self.cfg.model.hf_path)
        ckpt = find_stage_end(self.ckpt_root, prev)
        if ckpt is None:
            raise FileNotFoundError(
                f"stage {name!r} starts from the end of {prev!r}, but {self.ckpt_root} has no "
                f"checkpoint marked as the end of {prev!r}"
            )
        return ckpt, self.out / "hf" / prev

    def _stop_requested(self) -> bool:
        return bool(broadcast_object(self.stop_file.exists() if self.rank == 0 else None))

    def _build(self, name: str, stage_cfg: Any, load_from: Path | None, *, trainable: bool):
        from megatron_revisual.convert.dist_ckpt import load_model_checkpoint
        from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights

        cfg = self.cfg
        model = model_family(cfg.model).build(cfg, pre_process=ps.is_pipeline_first_stage(),
                                              post_process=ps.is_pipeline_last_stage())
        if load_from is not None:
            load_model_checkpoint(model, load_from)
        else:
            load_hf_weights(model, SafetensorsReader(cfg.model.hf_path), cfg.model,
                            tp_rank=ps.get_tensor_model_parallel_rank(),
                            tp_size=ps.get_tensor_model_parallel_world_size())
        if not trainable:
            for p in model.parameters():
                p.requires_grad_(False)
            return model.eval()
        if getattr(stage_cfg, "freeze_vision_tower", False) and model.vision_model is not None:
            for p in model.vision_model.parameters():
                p.requires_grad_(False)
        return model

    def _wrap(self, model: torch.nn.Module, stage_cfg: Any, total_steps: int, warmup: int | None):
        """DDP, a fresh optimizer and LR schedule for the stage (the run's optim with the stage's
        overrides; `warmup` steps unless the stage sets lr_warmup_steps itself)."""
        from megatron_revisual.train.builders import build_optimizer, wrap_ddp

        o = OptimConfig(**{**dataclasses.asdict(self.cfg.optim), **stage_cfg.optim})
        if warmup is not None and "lr_warmup_steps" not in stage_cfg.optim:
            o.lr_warmup_steps = warmup
        ddp = wrap_ddp(self.cfg, model)
        optimizer, scheduler = build_optimizer(
            self.cfg, [ddp], optim=o, decay_steps=max(total_steps, o.lr_warmup_steps + 1)
        )
        return ddp, optimizer, scheduler

    def _save(self, name: str, stage_step: int, total: int, *, model, optimizer, scheduler, loop,
              stage_end: bool) -> Path:
        state = {
            "global_step": self.global_step,
            "stage": name,
            "stage_step": stage_step,
            "stage_steps_total": total,
            "stage_complete": stage_end,
            "stage_end": name if stage_end else None,
            "data": loop.data_state(),
            "wandb_run_id": self.log.wandb_run_id if self.log is not None else None,
            "config_name": self.cfg.name,
            **loop.schedule_state(stage_step),
        }
        state = broadcast_object(state)  # rank 0's wandb id
        state.update(checkpoint_format=CHECKPOINT_FORMAT, layout=current_layout())
        self._complete_saves(blocking=True)  # one save in flight at a time
        path = save_checkpoint(
            self.ckpt_root, self.global_step, state=training_state_dict(model, optimizer, scheduler),
            model_cfg=self.cfg.model, hf_side_dir=self.cfg.model.hf_path, rank_state={"rng": rng_state()},
            trainer_state=state, keep_last=self.cfg.checkpoint.keep_last, async_saves=self.async_saves,
        )
        if self.log is not None:
            self.log.note(f"[{name}] checkpoint {path}" + (" (writing in the background)" if self.async_saves else ""))
        return path

    def _complete_saves(self, *, blocking: bool) -> None:
        """Collective: complete the background saves whose writes finished (all, when blocking)."""
        if self.async_saves is None:
            return
        for path in self.async_saves.poll(blocking=blocking):
            if self.log is not None:
                self.log.note(f"checkpoint {path} complete")

    def _export(self, name: str, ddp: torch.nn.Module) -> Path:
        """The policy as an HF directory <output_dir>/hf/<name> (collective)."""
        from megatron_revisual.convert.export import hf_tensor_specs, stream_hf_tensors
        from megatron_revisual.convert.hf_write import write_hf_side_files, write_hf_weights
        from megatron_revisual.convert.safetensors_io import TensorSpec
        from megatron_revisual.staged_dir import staged_output_dir

        out = self.out / "hf" / name
        specs = [TensorSpec(n, s, d) for n, s, d in hf_tensor_specs(ddp, self.cfg.model)]
        stream = stream_hf_tensors(ddp, self.cfg.model)
        if self.rank == 0:
            with staged_output_dir(out, overwrite=True) as tmp:
                write_hf_weights(tmp, specs, stream)
                write_hf_side_files(tmp, self.cfg.model, self.cfg.model.hf_path)
        else:
            for _ in stream:  # the gathers are collective
                pass
        dist.barrier()
        return out

    def run_stage(self, name: str, *, resume: bool) -> str:
        from megatron_revisual.train.builders import params_gathered

        cfg = self.cfg
        stage_cfg = getattr(cfg, name)
        start_ckpt, start_hf = self._start_point(name)
        state = self.resume_state if resume else None
        load_from = self.resume_dir if resume else start_ckpt
        model = self._build(name, stage_cfg, load_from, trainable=True)
        ctx = StageContext(cfg=cfg, name=name, stage_cfg=stage_cfg, start_hf=start_hf, resume_state=state,
                           log=self.log, engines=self.engines)
        sft = isinstance(stage_cfg, SFTStageConfig)
        loop: Stage
        if sft:
            loop = SFTLoop(ctx)
        else:
            reference = None
            if stage_cfg.rl.kl_coef > 0:
                reference = self._build(name, stage_cfg, start_ckpt, trainable=False)
            loop = GRPOLoop(ctx, reference)
        total = loop.total_steps
        ddp, optimizer, scheduler = self._wrap(model, stage_cfg, total * loop.updates_per_step, loop.warmup_steps)
        loop.attach(ddp, optimizer, scheduler)
        first = 1
        if state is not None:
            note = restore_training_state(self.resume_dir, model=model, optimizer=optimizer, scheduler=scheduler)
            if note is not None and self.log is not None:
                self.log.note(note)
            loop.load_data_state(state["data"])
            first = int(state["stage_step"]) + 1
        loop.start(resumed_at=first - 1)
        if self.log is not None:
            kind = "SFT" if sft else "GRPO"
            self.log.note(f"=== stage {name} ({kind}, {cfg.stages.index(name) + 1} of {len(cfg.stages)}): "
                          f"steps {first}..{total}; {loop.describe()}")
            self.log.log({"global_step": self.global_step, "stage": name, "event": "stage_start",
                          "time": time.time(), **loop.data_report()})
        try:
            for stage_step in range(first, total + 1):
                t0 = time.perf_counter()
                row = loop.step(stage_step, self.global_step + 1)
                self.global_step += 1
                if loop.validation_due(stage_step):
                    t_val = time.perf_counter()
                    row.update(loop.validate())
                    row["time/validation"] = time.perf_counter() - t_val
                for hook in self.step_hooks:
                    row.update(hook(name, stage_step))
                row = {"global_step": self.global_step, "stage": name, "stage_step": stage_step,
                       **row, "time/step": time.perf_counter() - t0, "time": time.time()}
                if self.log is not None:
                    self.log.log(row)
                    self.log.progress(name, stage_step, total, row)
                self._complete_saves(blocking=False)
                stop = self._stop_requested()
                every = cfg.checkpoint.every
                if stage_step < total and (stop or (every and self.global_step % every == 0)):
                    with params_gathered(ddp):
                        self._save(name, stage_step, total, model=model, optimizer=optimizer,
                                   scheduler=scheduler, loop=loop, stage_end=False)
                if stop and stage_step < total:
                    self._complete_saves(blocking=True)
                    self._consume_stop()
                    return "stopped"
            with params_gathered(ddp):
                self.final_export = self._export(name, ddp)
                self._save(name, total, total, model=model, optimizer=optimizer, scheduler=scheduler,
                           loop=loop, stage_end=True)
            self._complete_saves(blocking=True)  # the next stage starts from this checkpoint
            loop.hand_over()
        finally:
            loop.close()
        if self._stop_requested():
            self._consume_stop()
            return "stopped" if name != cfg.stages[-1] else "done"
        return "done"

    def _consume_stop(self) -> None:
        if self.rank == 0:
            self.stop_file.unlink(missing_ok=True)
            self.log.note("stop requested: checkpoint written; exiting to be resumed")
        dist.barrier()
