"""What the curriculum runner (`train.stages.StageRunner`) and its stages share.

A stage is anything with the `Stage` protocol's methods; `SFTLoop` (cold start) and `GRPOLoop`
(mrl, trl) are the two, chosen by the type of the stage's config section
(`SFTStageConfig` / `GRPOStageConfig`), not by its name. A stage is built from a
`StageContext`: the run's config, its own section, the weights it starts from, the resumed
state, the metrics log and the shelf on which a GRPO stage leaves its engines for the next one.
It does not see the runner.

Also here: the per-step helpers both stages use (the step seed, DP rank and size, the row
multiple every packed row is padded to, report formatting).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from megatron.core import parallel_state as ps

from megatron_revisual.config.schema import RunConfig
from megatron_revisual.data.packing import row_length_multiple

__all__ = ["EngineShelf", "Stage", "StageContext", "dp_info", "mean", "row_multiple", "skipped_report",
           "step_seed"]


class EngineShelf:
    """The engines a finished GRPO stage leaves for the next stage (one engine for the run when
    consecutive stages share their engine settings, `grpo_loop.engine_key`)."""

    def __init__(self) -> None:
        self._kept: tuple[Any, Any] | None = None  # (engine key, rollout)

    @property
    def holding(self) -> bool:
        return self._kept is not None

    def keep(self, key: Any, rollout: Any) -> None:
        """A finished stage's engines (`GRPOLoop.hand_over`), for the next stage to take."""
        self._kept = (key, rollout)

    def take(self, key: Any) -> Any | None:
        """The kept engines if their key is `key`; else they close and None."""
        if self._kept is None:
            return None
        kept_key, rollout = self._kept
        self._kept = None
        if kept_key == key:
            return rollout
        rollout.close()
        return None

    def close(self) -> None:
        if self._kept is not None:
            self._kept[1].close()
            self._kept = None


@dataclasses.dataclass
class StageContext:
    """What a stage is built from. `start_hf`: the HF directory of the weights the stage starts
    from (its tokenizer, and what a rollout engine loads first); `resume_state`: the trainer
    state of the checkpoint the stage resumes from, or None; `log`: rank 0's `MetricsLog`, None
    on the other ranks."""

    cfg: RunConfig
    name: str
    stage_cfg: Any
    start_hf: Path
    resume_state: dict[str, Any] | None = None
    log: Any = None
    engines: EngineShelf = dataclasses.field(default_factory=EngineShelf)


class Stage(Protocol):
    """What `StageRunner.run_stage` calls, in this order: `attach` (after the optimizer is built
    with `total_steps * updates_per_step` updates and `warmup_steps`), `load_data_state` on a
    resume, `start`, then for each step `step`, `validation_due` / `validate`, `data_state` and
    `schedule_state` at checkpoints; `hand_over` at the stage's end and `close` always."""

    total_steps: int
    updates_per_step: int
    warmup_steps: int | None

    def attach(self, ddp: Any, optimizer: Any, scheduler: Any) -> None: ...
    def start(self, resumed_at: int) -> None: ...
    def describe(self) -> str: ...
    def data_report(self) -> dict[str, int]: ...
    def data_state(self) -> dict[str, Any]: ...
    def load_data_state(self, state: dict[str, Any]) -> None: ...
    def schedule_state(self, stage_step: int) -> dict[str, Any]: ...
    def step(self, stage_step: int, global_step: int) -> dict[str, Any]: ...
    def validation_due(self, stage_step: int) -> bool: ...
    def validate(self) -> dict[str, float]: ...
    def hand_over(self) -> None: ...
    def close(self) -> None: ...


def step_seed(seed: int, global_step: int, salt: int = 0) -> int:
    """A per-step seed (rollouts, PAD draws) from the run seed and the global step alone."""
    digest = hashlib.sha256(f"{seed}:{global_step}:{salt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def dp_info() -> tuple[int, int]:
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def row_multiple(cfg: RunConfig) -> int:
    """The multiple every packed row is padded to (SP, CP and the FP8 recipe's block)."""
    p, pr = cfg.parallel, cfg.precision
    return row_length_multiple(tp=p.tensor_model_parallel_size, sequence_parallel=p.sequence_parallel,
                               cp=p.context_parallel_size, fp8_recipe=pr.fp8_recipe if pr.fp8 else None)


def skipped_report(prefix: str, counts: Counter | dict[str, int]) -> dict[str, int]:
    return {f"{prefix}/{k}": int(v) for k, v in sorted(counts.items())}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
