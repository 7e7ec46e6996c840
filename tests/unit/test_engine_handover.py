"""One engine for the run: consecutive GRPO stages with the same engine settings share their
engines (`GRPOLoop.hand_over` -> `EngineShelf.keep` -> `take`), any other next
stage gets new ones and the old ones close. The demo test checks the real run (its TRL stage
takes MRL's engines); here the decisions, on the recipes and on stand-in engines."""

from __future__ import annotations

from pathlib import Path

from megatron_revisual.config import load_config
from megatron_revisual.train.grpo_loop import GRPOLoop, engine_config, engine_key
from megatron_revisual.train.stage_common import EngineShelf, StageContext

ROOT = Path(__file__).resolve().parents[2]


class _Rollout:
    """Stands in for `rollout.colocated.ColocatedRollout` (no engine)."""

    def __init__(self, state="awake"):
        from megatron_revisual.rollout.types import EngineState

        self.state, self.closed, self.slept = EngineState(state), False, False

    def sleep(self):
        from megatron_revisual.rollout.types import EngineState

        self.slept, self.state = True, EngineState.ASLEEP

    def close(self):
        self.closed = True


def _runner() -> EngineShelf:
    return EngineShelf()  # what the runner keeps between stages


def _hand_over(cfg, stage: str, runner: EngineShelf, rollout: _Rollout) -> None:
    loop = GRPOLoop.__new__(GRPOLoop)  # hand_over reads the config, the context and the engines only
    ctx = StageContext(cfg=cfg, name=stage, stage_cfg=getattr(cfg, stage), start_hf=Path("unused"), engines=runner)
    loop.ctx, loop.cfg, loop.name, loop.stage, loop.rollout = ctx, cfg, stage, ctx.stage_cfg, rollout
    loop.hand_over()


def test_the_h100_recipes_share_one_engine_from_mrl_to_trl():
    for recipe in ("qwen25_vl_7b_8xh100", "qwen25_vl_3b_8xh100", "qwen25_vl_32b_4x8xh100",
                   "revisual_r1_released_7b_8xh100"):
        cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
        assert engine_key(cfg, cfg.mrl) == engine_key(cfg, cfg.trl), recipe
    cfg = load_config(ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml")
    # the weights an engine starts from are not part of the key; its settings are
    assert engine_config(cfg, cfg.mrl, "a").model_path == "a"
    for override in ("trl.rollout.max_response_length=4096", "trl.rollout.tensor_parallel_size=4",
                     "trl.rollout.gpu_memory_utilization=0.5", "trl.rollout.placement=rank0"):
        changed = load_config(ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml", [override])
        assert engine_key(changed, changed.mrl) != engine_key(changed, changed.trl), override


def test_a_finished_stage_hands_its_sleeping_engines_to_a_like_next_stage():
    cfg = load_config(ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml")
    runner, rollout = _runner(), _Rollout()
    _hand_over(cfg, "mrl", runner, rollout)
    assert rollout.slept and not rollout.closed  # kept, asleep, for trl
    assert runner.take(engine_key(cfg, cfg.trl)) is rollout
    assert runner.take(engine_key(cfg, cfg.trl)) is None  # taken once

    # the last stage, or a next stage with other settings: nothing is kept
    runner = _runner()
    _hand_over(cfg, "trl", runner, _Rollout())
    assert not runner.holding
    other = load_config(ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml", ["trl.rollout.max_response_length=4096"])
    _hand_over(other, "mrl", runner, _Rollout())
    assert not runner.holding


def test_kept_engines_that_the_next_stage_cannot_use_are_closed():
    cfg = load_config(ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml")
    runner, rollout = _runner(), _Rollout()
    runner.keep(engine_key(cfg, cfg.mrl), rollout)
    assert runner.take(("another", "key")) is None and rollout.closed
    runner.keep(engine_key(cfg, cfg.mrl), kept := _Rollout())
    runner.close()  # a run that stops between the stages
    assert kept.closed and not runner.holding


def test_restage_sends_every_tensor_at_the_next_stages_first_sync():
    from megatron_revisual.rollout.colocated import ColocatedRollout, Placement

    rollout = ColocatedRollout(Placement(world_size=1, engine_tp=1), lambda: None, rank=0,
                               frozen_prefixes=("visual.",))
    rollout.syncs = 5
    rollout.restage(frozen_prefixes=())
    assert rollout.syncs == 0 and rollout.frozen_prefixes == ()
