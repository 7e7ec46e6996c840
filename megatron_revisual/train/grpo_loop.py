"""GRPO + PAD steps for `train.stages.StageRunner` (the mrl and trl stages).

The step is described in `train.stages`. Seeds: the rollout engine samples request i's j-th
response with seed step_seed(seed, global step) + i * n + j, and PAD draws from a generator
seeded the same way, so a step's numbers depend on the weights, the data position and the step
number only. The engine starts from the stage's start weights; a resumed stage streams the
checkpoint's weights into it before its first rollout (the same reload path an uninterrupted
run's engine took). The entropy bonus follows the stage's count of optimizer updates
(`updates_done`, kept in checkpoints), as the released actor's schedule does.

Options of `rl` handled here: kl_in_reward (old and reference log-probs of every response
before the advantages: one extra forward pass of each model over the step), rollout_correction
(the engine's log-probs ride along with each sample; `rollout_corr/*` metrics), policy_loss.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_revisual.data.datasets import (
    PromptDataset,
    PromptLoader,
    dataset_spec,
    load_prompt_dataset,
    rollout_request,
)
from megatron_revisual.data.sft import load_tokenizer_and_processor
from megatron_revisual.models.registry import model_family
from megatron_revisual.parallel.device import all_reduce, broadcast_object
from megatron_revisual.rl.losses import entropy_coefficient, kl_penalty
from megatron_revisual.rl.pad import PAD
from megatron_revisual.rl.rewards import RewardConfig, RewardSample, compute_reward
from megatron_revisual.rl.rollout_correction import correction_metrics
from megatron_revisual.rollout.colocated import (
    ColocatedRollout,
    Placement,
    start_engine,
)
from megatron_revisual.rollout.engine import load_image
from megatron_revisual.rollout.types import EngineState, SamplingConfig
from megatron_revisual.train.grpo_plan import (
    Rewards,
    Rollout,
    Selection,
    UpdatePlan,
    deal,
    planned_updates_per_step,
    reward_metrics,
    select_samples,
)
from megatron_revisual.train.grpo_step import (
    PolicySample,
    apply_rollout_correction,
    attach_log_probs,
    build_policy_batches,
    compute_log_probs,
    global_loss_counts,
    grpo_update,
    response_values,
)
from megatron_revisual.train.stage_common import (
    StageContext,
    dp_info,
    mean,
    row_multiple,
    skipped_report,
    step_seed,
)

__all__ = ["GRPOLoop", "engine_config", "engine_key", "load_validation_set", "logprob_gaps", "validation_report"]
_UPDATE_METRICS = ("loss", "pg_loss", "kl", "entropy", "pg_clipfrac_higher", "pg_clipfrac_lower",
                   "ppo_kl", "grad_norm", "skipped_non_finite")


@contextmanager
def _timed(times: dict[str, float], key: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        times[key] = time.perf_counter() - t


class GRPOLoop:
    warmup_steps = None

    def __init__(self, ctx: StageContext, reference: torch.nn.Module | None = None) -> None:
        self.ctx, self.cfg, self.stage, self.name = ctx, ctx.cfg, ctx.stage_cfg, ctx.name
        stage_cfg, hf_dir = ctx.stage_cfg, ctx.start_hf
        self.engine_dir = hf_dir
        self.reference = reference
        self.rank = dist.get_rank()
        vision = self.cfg.model.vision is not None
        self.tokenizer, self.processor = load_tokenizer_and_processor(hf_dir, vision)
        r = stage_cfg.rollout
        self.dataset = load_prompt_dataset(
            dataset_spec(stage_cfg.data), tokenizer=self.tokenizer, max_prompt_length=r.max_prompt_length
        )
        self.loader = PromptLoader(self.dataset, stage_cfg.rollout_batch_size, seed=self.cfg.train.seed)
        self.val_dataset = load_validation_set(stage_cfg, self.tokenizer)
        rl = stage_cfg.rl
        weights = None
        if rl.reward_preset == "ours":
            # accuracy is always scored and logged, weighted or not (the headline number); every
            # preset reports format
            weights = {"accuracy": 0.0, **(rl.reward_weights or {"accuracy": 1.0})}
        self.reward_cfg = RewardConfig(preset=rl.reward_preset, grader=rl.reward_grader, weights=weights,
                                       length_budget=rl.length_budget)
        self.total_steps = stage_cfg.steps
        self.pad = PAD.from_config(rl.pad, self.total_steps)  # its tau is checkpointed even when off
        self.updates_per_step = planned_updates_per_step(stage_cfg)
        self.updates_done = 0  # optimizer updates of this stage: the entropy schedule's clock
        self.mrope = model_family(self.cfg.model).position_config(self.cfg.model)
        r = stage_cfg.rollout
        self.placement = Placement(world_size=dist.get_world_size(), engine_tp=r.tensor_parallel_size,
                                   mode=r.placement)
        self.rollout: ColocatedRollout | None = None
        self.last_sync = None
        self.reward_pool = None
        self.rollout_skips: Counter = Counter()

    # --- set-up ------------------------------------------------------------------------------
    def attach(self, ddp, optimizer, scheduler) -> None:
        self.model, self.optimizer, self.scheduler = ddp, optimizer, scheduler

    def describe(self) -> str:
        s = self.stage
        return (f"{len(self.dataset)} prompts, {s.rollout_batch_size} x n={s.rollout.n} per step, "
                f"updates of {s.global_batch_size} prompts' samples, {self.placement.num_engines} "
                f"{s.rollout.engine} engine(s) ({s.rollout.placement})")

    def data_report(self) -> dict[str, int]:
        report = {"data/usable_rows": len(self.dataset), **skipped_report("data/skipped", self.dataset.skipped)}
        if self.val_dataset is not None:
            report.update(skipped_report("data/val_skipped", self.val_dataset.skipped))
        return report

    def data_state(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "rollout_skips": dict(self.rollout_skips),
                "updates_done": self.updates_done}

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.rollout_skips.update(state.get("rollout_skips", {}))
        # checkpoints from before the count was kept: the LR schedule counted the same updates
        # (except non-finite ones)
        self.updates_done = int(state.get("updates_done", getattr(self.scheduler, "num_steps", 0)))

    def entropy_coef(self, update: int) -> float:
        """beta of the stage's optimizer update `update` (0-based)."""
        rl = self.stage.rl
        if rl.entropy_coef == 0:
            return 0.0
        exp = rl.entropy_decay_style == "exp"
        return entropy_coefficient(
            update, init=rl.entropy_coef, warmup_steps=rl.entropy_warmup_steps,
            schedule=rl.entropy_decay_style, decay=rl.entropy_decay if exp else None,
            total_steps=None if exp else self.total_steps * self.updates_per_step,
        )

    def schedule_state(self, stage_step: int) -> dict[str, Any]:
        return {"pad_tau": self.pad.tau_at(stage_step), "entropy_coef": self.entropy_coef(self.updates_done),
                "updates_done": self.updates_done}

    def start(self, resumed_at: int) -> None:
        """The stage's engines: those the previous GRPO stage left when their settings are this
        stage's (`StageContext.engines`: one engine for the run; it takes this stage's start
        weights, which are the previous stage's end), else new ones from the stage's start weights."""
        frozen = ("visual.",) if getattr(self.stage, "freeze_vision_tower", False) else ()
        log_dir = Path(self.cfg.output_dir) / "logs"
        kept = self.ctx.engines.take(engine_key(self.cfg, self.stage))
        if kept is not None:
            self.rollout = kept
            kept.restage(frozen_prefixes=frozen)
            seconds = self._sync_weights()
            if self.rank == 0:
                self.ctx.log.note(f"[{self.name}] rollout engines kept from the previous stage: "
                                     f"this stage's start weights synced in {seconds:.1f} s")
        else:
            config = engine_config(self.cfg, self.stage, self.engine_dir)
            self.rollout = ColocatedRollout(
                self.placement, lambda: start_engine(self.placement, config, rank=self.rank, log_dir=log_dir),
                rank=self.rank, frozen_prefixes=frozen)
        if self.rank == 0:
            rl = self.stage.rl
            if rl.reward_workers:
                from megatron_revisual.rl.reward_pool import RewardPool

                self.reward_pool = RewardPool.for_config(
                    self.reward_cfg, num_workers=rl.reward_workers, timeout_s=rl.reward_timeout_s
                )
        if resumed_at > 0 and kept is None:
            self._sync_weights()

    def hand_over(self) -> None:
        """At the stage's end: when the next stage is a GRPO stage with the same engine settings
        (`engine_key`), the engines stay for it, asleep, on the context's shelf; else they close with
        this stage. Going from MRL to TRL then starts no second engine in the process."""
        stages = self.cfg.stages
        later = stages[stages.index(self.name) + 1:]
        following = getattr(self.cfg, later[0]) if later else None
        key = engine_key(self.cfg, self.stage)
        if (self.rollout is None or following is None or not hasattr(following, "rollout")
                or engine_key(self.cfg, following) != key):
            return
        if self.rollout.state is EngineState.AWAKE:
            self.rollout.sleep()
        self.ctx.engines.keep(key, self.rollout)
        self.rollout = None

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.close()
            self.rollout = None
        if self.reward_pool is not None:
            self.reward_pool.close()
            self.reward_pool = None

    # --- pieces of a step ------------------------------------------------------------------
    def _sync_weights(self) -> float:
        """The trainer's weights into every engine (collective); wakes sleeping engines."""
        from megatron_revisual.train.builders import params_gathered

        bucket = self.stage.rollout.weight_bucket_mb * 2**20
        with params_gathered(self.model):
            report = self.rollout.sync_model(self.model, self.cfg.model, bucket_bytes=bucket)
        self.last_sync = report
        return report.seconds

    def _generate(self, records, sampling: SamplingConfig):
        """Every engine samples its share; every rank gets the batch, ordered by (request, sample),
        and the engine of each request."""
        from megatron_revisual.rollout.colocated import request_cost

        requests = [rollout_request(r, self.tokenizer) for r in records]
        costs = [request_cost(len(self.tokenizer(q.prompt, add_special_tokens=False)["input_ids"]), len(q.images))
                 for q in requests]
        batch = self.rollout.generate(requests, sampling, costs=costs)
        engine_of = [0] * len(requests)
        for e, shard in enumerate(self.rollout.shards(requests, costs)):
            for i in shard:
                engine_of[i] = e
        return batch.samples, batch, tuple(engine_of)

    def _score(self, records, samples) -> list[dict[str, float]]:
        scores = None
        if self.rank == 0:
            items = [RewardSample(response=s.text, ground_truth=records[s.request_index].answer,
                                  response_length=len(s.token_ids)) for s in samples]
            if self.reward_pool is not None:
                result = self.reward_pool.score(items)
                scores = [sc if isinstance(sc, dict) else {"overall": 0.0} for sc in result.scores]
            else:
                scores = [compute_reward(item, self.reward_cfg) for item in items]
        return broadcast_object(scores)

    def _vision_inputs(self, record, prompt_ids: list[int], where: str):
        if not record.images:
            return None, None
        out = self.processor.image_processor(images=[load_image(im) for im in record.images], return_tensors="pt")
        grid = out["image_grid_thw"]
        merge = self.cfg.model.vision.spatial_merge_size
        want = int((grid.prod(-1) // (merge * merge)).sum())
        have = sum(1 for t in prompt_ids if t == self.cfg.model.image_token_id)
        if want != have:
            raise ValueError(f"{where}: the engine's prompt has {have} image placeholders, the "
                             f"processor makes {want} image tokens; the engine and the trainer disagree")
        return out["pixel_values"], grid

    def _policy_samples(self, records, samples, advantages, chosen: list[int], *,
                        with_rollout_log_probs: bool = False) -> list[PolicySample]:
        out = []
        vision: dict[int, tuple[Any, Any]] = {}  # a request's n samples share its image
        for i in chosen:
            s = samples[i]
            record = records[s.request_index]
            if s.request_index not in vision:
                vision[s.request_index] = self._vision_inputs(record, s.prompt_token_ids, record.uid)
            pixels, grid = vision[s.request_index]
            rollout_lp = torch.tensor(s.logprobs, dtype=torch.float32) if with_rollout_log_probs else None
            out.append(PolicySample(
                prompt_ids=torch.tensor(s.prompt_token_ids, dtype=torch.long),
                response_ids=torch.tensor(s.token_ids, dtype=torch.long),
                advantage=float(advantages[i]), pixel_values=pixels, image_grid_thw=grid,
                rollout_log_probs=rollout_lp,
            ))
        return out

    def _batches(self, policy_samples: list[PolicySample]):
        return build_policy_batches(
            policy_samples, config=self.mrope, micro_batch_tokens=self.stage.micro_batch_tokens,
            pad_to_multiple_of=row_multiple(self.cfg), cp_size=self.cfg.parallel.context_parallel_size,
            pad_token_id=self.tokenizer.pad_token_id or 0,
        )

    # --- the step ------------------------------------------------------------------------------
    def step(self, stage_step: int, global_step: int) -> dict[str, Any]:
        """rollout -> (engines sleep) -> rewards -> advantages and selection -> old / reference
        log-probs -> updates -> weight sync (engines wake: weights, sync, KV cache), each timed; a
        step that selects nothing ends early and wakes the engines with the weights they had."""
        row: dict[str, Any] = {}
        times: dict[str, float] = {}
        with _timed(times, "time/rollout"):
            rollout = self._rollout(global_step)
            self.rollout.sleep()  # the engines' memory is the trainer's until the weight sync
        row.update(rollout.metrics)
        with _timed(times, "time/reward"):
            scores = self._score(rollout.records, rollout.samples)
        if not rollout.samples:
            self.rollout.wake()
            return self._skipped({**row, **reward_metrics(scores)}, times)
        rewards = self._rewards(rollout, scores, times, global_step)
        row.update(rewards.metrics)
        selection = self._select(rollout, rewards, stage_step, global_step)
        row.update(selection.metrics)
        if not selection.minis:
            self.rollout.wake()
            return self._skipped(row, times)
        with _timed(times, "time/old_and_ref_logprob"):
            planned = self._plan_updates(rollout, selection)
        row.update(planned.metrics)
        if not planned.batches:
            self.rollout.wake()
            return self._skipped(row, times)
        with _timed(times, "time/update"):
            row.update(self._update(planned, stage_step))
        with _timed(times, "time/sync"):
            self._sync_weights()  # wakes the engines' weights, streams ours in, wakes their KV cache
        row.update({"rollout/sync_bytes_per_rank": float(self.last_sync.bytes_to_engine),
                    "rollout/sync_tp_peer_bytes_per_rank": float(self.last_sync.bytes_to_tp_peers),
                    "rollout/engines": float(self.placement.num_engines)})
        return {**row, **times}

    def _rollout(self, global_step: int) -> Rollout:
        """The step's prompts sampled by the engines (`step` puts them to sleep after)."""
        r = self.stage.rollout
        records = self.loader.next_batch()
        sampling = SamplingConfig(n=r.n, max_tokens=r.max_response_length, temperature=r.temperature,
                                  top_p=r.top_p, top_k=r.top_k, seed=step_seed(self.cfg.train.seed, global_step))
        samples, batch, engine_of = self._generate(records, sampling)
        self.rollout_skips.update(batch.skipped_counts())
        # GRPO needs whole groups: requests the engine skipped have none; any other shape is a bug
        groups = Counter(s.request_index for s in samples)
        if any(c != r.n for c in groups.values()):
            raise RuntimeError(f"rollout groups must have n={r.n} samples each, got {dict(groups)}")
        lengths = [len(s.token_ids) for s in samples]
        metrics = {
            "response/length_mean": mean(lengths), "response/length_max": float(max(lengths, default=0)),
            "response/clip_ratio": mean([float(s.finish_reason == "length") for s in samples]),
            "rollout/samples": float(len(samples)), "rollout/skipped_requests": float(len(batch.skipped)),
            **{f"rollout/skipped/{k}": float(v) for k, v in sorted(self.rollout_skips.items())},
        }
        return Rollout(records=records, samples=samples, metrics=metrics, engine_of_request=engine_of)

    def _rewards(self, rollout: Rollout, scores: list[dict[str, float]], times: dict[str, float],
                 global_step: int) -> Rewards:
        """Each sample's scalar reward: the reward terms' `overall`, less the KL penalty when
        rl.kl_in_reward; plus `rehearsal.reward_noise` x U[0, 1) (seeded by the step), which a
        rehearsal's random model needs for any advantage to be non-zero."""
        rl = self.stage.rl
        metrics = reward_metrics(scores)
        rewards = torch.tensor([sc["overall"] for sc in scores], dtype=torch.float32)
        if self.cfg.rehearsal.reward_noise:
            gen = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, global_step, salt=3))
            rewards = rewards + self.cfg.rehearsal.reward_noise * torch.rand(len(rewards), generator=gen)
        if rl.kl_in_reward:
            with _timed(times, "time/kl_in_reward"):
                penalty = rl.kl_coef * self._sequence_kl(rollout.records, rollout.samples)
            rewards = rewards - penalty.float()
            metrics.update({"reward/kl_penalty": float(penalty.mean()),
                            "reward/with_kl_penalty": float(rewards.mean())})
        return Rewards(values=rewards, metrics=metrics)

    def _select(self, rollout: Rollout, rewards: Rewards, stage_step: int, global_step: int) -> Selection:
        """`grpo_plan.select_samples` with this stage's settings and the step's PAD draws."""
        rl, r = self.stage.rl, self.stage.rollout
        gen = None
        if rl.pad.enabled:
            gen = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, global_step, salt=1))
        return select_samples(rollout.samples, rewards, n=r.n, normalize_std=rl.normalize_std,
                              pad=self.pad if rl.pad.enabled else None, stage_step=stage_step,
                              global_step=global_step, generator=gen,
                              global_batch_size=self.stage.global_batch_size, dp=dp_info()[0])

    def _plan_updates(self, rollout: Rollout, selection: Selection) -> UpdatePlan:
        """This DP rank's micro-batches of every mini-batch, with old (and reference) log-probs
        from before any update, and the rollout correction's weights."""
        rl, r = self.stage.rl, self.stage.rollout
        records, samples = rollout.records, rollout.samples
        dp, dp_rank = dp_info()
        rc = rl.rollout_correction
        kl_in_loss = self.reference is not None and not rl.kl_in_reward
        planned, diffs, corrections, imbalance = [], [], [], []
        for mini in selection.minis:
            mine, ratio = deal(samples, mini, dp, dp_rank)
            imbalance.append(ratio)
            batches = self._batches(self._policy_samples(records, samples, selection.advantages, mine,
                                                         with_rollout_log_probs=rc.enabled))
            # the policy being optimised is the one that sampled: logits / rollout temperature
            old = compute_log_probs(self.model, batches, temperature=r.temperature or 1.0)
            ref = compute_log_probs(self.reference, batches, temperature=r.temperature or 1.0) if kl_in_loss else None
            batches = attach_log_probs(batches, old=old, ref=ref)
            if rc.enabled:
                batches, sums, maxima = apply_rollout_correction(batches, rc)
                corrections.append((sums, maxima))
            planned.append(batches)
            if r.temperature != 1.0:  # the engine reports untempered log-probs: nothing to compare
                continue
            for k, values in response_values(batches, old).items():
                engine_lp = torch.tensor(samples[mine[k]].logprobs, dtype=torch.float32)
                diffs.append((rollout.engine_of_request[samples[mine[k]].request_index], (values - engine_lp).abs()))
        metrics = {"update/dp_tokens_max_over_mean": max(imbalance), **logprob_gaps(diffs, self.placement.num_engines)}
        if rc.enabled:
            metrics.update(self._correction_metrics(corrections))
            if rc.seq is not None:  # a mini-batch whose sequences were all rejected has no loss
                planned = [b for b in planned if global_loss_counts(b)[0] > 0]
        return UpdatePlan(batches=planned, kl_in_loss=kl_in_loss, metrics=metrics)

    def _update(self, planned: UpdatePlan, stage_step: int) -> dict[str, Any]:
        """rl.ppo_epochs passes of one optimizer update per mini-batch; their mean metrics."""
        rl, r = self.stage.rl, self.stage.rollout
        gspo = rl.policy_loss == "gspo"
        updates, betas = [], []
        for _epoch in range(rl.ppo_epochs):
            for batches in planned.batches:
                betas.append(self.entropy_coef(self.updates_done))
                updates.append(grpo_update(
                    self.model, self.optimizer, batches, loss_type=rl.policy_loss,
                    clip_low=rl.gspo_clip_low if gspo else rl.clip_low,
                    clip_high=rl.gspo_clip_high if gspo else rl.clip_high, clip_dual=rl.clip_dual,
                    kl_coef=rl.kl_coef if planned.kl_in_loss else 0.0, kl_kind=rl.kl_kind,
                    entropy_coef=betas[-1], agg=rl.loss_agg, scheduler=self.scheduler,
                    temperature=r.temperature or 1.0,
                ))
                # the released actor anneals after every optimizer call, skipped ones included
                self.updates_done += 1
        row: dict[str, Any] = {}
        for k in _UPDATE_METRICS:
            values = [u[k] for u in updates if k in u]
            if values:
                row[k] = mean(values)
        row.update({"lr": updates[-1]["lr"], "entropy_coef": mean(betas), "updates": float(len(updates)),
                    "stage_updates": float(self.updates_done),
                    "update/sequences": float(sum(u["num_sequences"] for u in updates))})
        if any(u["skipped_non_finite"] for u in updates) and self.rank == 0:
            self.ctx.log.note(f"[{self.name}] step {stage_step}: non-finite gradient; update skipped")
        return row

    def _skipped(self, row: dict[str, Any], times: dict[str, float]) -> dict[str, Any]:
        """The row of a step that updated nothing (its engines already woken by `step`)."""
        return {**row, "skipped_step": 1.0, **times}

    def _sequence_kl(self, records, samples) -> torch.Tensor:
        """sum_t KL_t(pi_old || pi_ref) of every response (float64 [N], the same on every rank),
        its forward passes split over the DP ranks."""
        rl, temperature = self.stage.rl, self.stage.rollout.temperature or 1.0
        dp, dp_rank = dp_info()
        mine, _ = deal(samples, [i for i, s in enumerate(samples) if s.token_ids], dp, dp_rank)
        out = torch.zeros(len(samples), dtype=torch.float64)
        # a rank dealt nothing still joins both passes (filler rows: `train.schedule`)
        batches = self._batches(self._policy_samples(records, samples, torch.zeros(len(samples)), mine))
        old = response_values(batches, compute_log_probs(self.model, batches, temperature=temperature))
        ref = response_values(batches, compute_log_probs(self.reference, batches, temperature=temperature))
        for k, i in enumerate(mine):
            out[i] = float(kl_penalty(old[k], ref[k], rl.kl_kind).sum())
        if dp > 1:
            out = all_reduce(out, group=ps.get_data_parallel_group())
        return out

    def _correction_metrics(self, corrections: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """`rollout_corr/*` over this step's samples on every DP rank."""
        sums = torch.stack([c[0] for c in corrections]).sum(0)
        maxima = torch.stack([c[1] for c in corrections]).max(0).values
        if ps.get_data_parallel_world_size() > 1:
            sums = all_reduce(sums, group=ps.get_data_parallel_group())
            maxima = all_reduce(maxima, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        return correction_metrics(sums, maxima, self.stage.rl.rollout_correction)

    def validation_due(self, stage_step: int) -> bool:
        v = self.stage.validation
        return bool(v.every and self.val_dataset is not None
                    and (stage_step % v.every == 0 or stage_step == self.total_steps))

    def validate(self) -> dict[str, float]:
        """Mean reward terms on the validation set with its own sampling (rank 0 computes)."""
        v = self.stage.validation
        records = [self.val_dataset[i] for i in range(len(self.val_dataset))][: v.max_prompts]
        sampling = SamplingConfig(n=v.n, max_tokens=self.stage.rollout.max_response_length,
                                  temperature=v.temperature, top_p=v.top_p,
                                  seed=step_seed(self.cfg.train.seed, 0, salt=2))
        samples, batch, _ = self._generate(records, sampling)
        scores = self._score(records, samples)
        out, warning = validation_report(len(records), samples, scores, batch.skipped_counts())
        if warning and self.rank == 0:
            self.ctx.log.note(f"[{self.name}] warning: {warning}")
        return out


def engine_config(cfg: Any, stage_cfg: Any, model_path: str | Path):
    """The engine settings of a GRPO stage (`rollout.colocated.start_engine` places it), loading
    `model_path`."""
    from megatron_revisual.rollout.engine import HFEngineConfig, VLLMEngineConfig

    r = stage_cfg.rollout
    settings = {
        "model_path": str(model_path),
        "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.model.params_dtype],
        "max_model_len": r.max_prompt_length + r.max_response_length,
        "max_prompt_tokens": r.max_prompt_length,
        "seed": cfg.train.seed,
        "max_images_per_prompt": 1 if cfg.model.vision is not None else 0,
    }
    if r.engine == "transformers":
        return HFEngineConfig(**settings)
    on_gpu = torch.cuda.is_available()
    return VLLMEngineConfig(
        **settings, tensor_parallel_size=r.tensor_parallel_size, enforce_eager=r.enforce_eager,
        gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=on_gpu,
        cpu_kv_cache_gib=None if on_gpu else (r.cpu_kv_cache_gib or 1.0),
        cpu_prepack_weights=r.cpu_prepack_weights,
    )


def engine_key(cfg: Any, stage_cfg: Any) -> tuple:
    """What decides whether two GRPO stages can share their engines: the placement and every
    engine setting but the weights it starts from."""
    r = stage_cfg.rollout
    return (r.placement, r.tensor_parallel_size, engine_config(cfg, stage_cfg, model_path=""))


def logprob_gaps(diffs: list[tuple[int, torch.Tensor]], num_engines: int) -> dict[str, float]:
    """|Megatron - engine| log-prob over a step's response tokens ((engine, gaps) per sample on
    this rank; reduced over DP), overall and the largest per engine: small when the engines hold
    the trainer's weights (a broken sync shows here first, on the engine it broke)."""
    flat = torch.cat([d for _, d in diffs]) if diffs else torch.zeros(0)
    stats = torch.tensor([float(flat.sum()), float(flat.numel())], dtype=torch.float64)
    top = torch.zeros(1 + num_engines, dtype=torch.float64)  # overall, then per engine
    for engine, d in diffs:
        if d.numel():
            top[0] = max(float(top[0]), float(d.max()))
            top[1 + engine] = max(float(top[1 + engine]), float(d.max()))
    if ps.get_data_parallel_world_size() > 1:
        stats = all_reduce(stats, group=ps.get_data_parallel_group())
        top = all_reduce(top, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    n = float(stats[1])
    out = {"rollout/logprob_diff_mean": float(stats[0]) / n if n else math.nan,
           "rollout/logprob_diff_max": float(top[0])}
    if num_engines > 1:
        out.update({f"rollout/logprob_diff_max/engine{e}": float(top[1 + e]) for e in range(num_engines)})
    return out


def load_validation_set(stage_cfg: Any, tokenizer: Any) -> PromptDataset | None:
    """The stage's validation prompts, through the same load-time filters as its training set
    (rows too long for rollout.max_prompt_length are skipped and counted); None without one."""
    v = stage_cfg.validation
    if v.data is None or not v.every:
        return None
    return load_prompt_dataset(dataset_spec(v.data), tokenizer=tokenizer,
                               max_prompt_length=stage_cfg.rollout.max_prompt_length)


def validation_report(prompts: int, samples: list[Any], scores: list[dict[str, float]],
                      skipped: dict[str, int]) -> tuple[dict[str, float], str | None]:
    """The val/* row of one validation run and, when it scored nothing, a warning naming why:
    how many prompts the engine skipped, per reason (their means would all be NaN)."""
    out = {"val/prompts": float(prompts), "val/skipped_requests": float(sum(skipped.values())),
           **{f"val/skipped/{k}": float(n) for k, n in sorted(skipped.items())}}
    if not samples:
        reasons = ", ".join(f"{k}: {n}" for k, n in sorted(skipped.items())) or "no reason given"
        return out, (f"validation scored nothing: the engine skipped {sum(skipped.values())} of "
                     f"{prompts} prompts ({reasons})")
    out.update({f"val/{k}": mean([sc.get(k, 0.0) for sc in scores])
                for k in sorted({k for sc in scores for k in sc})})
    out["val/response_length"] = mean([float(len(s.token_ids)) for s in samples])
    return out, None
