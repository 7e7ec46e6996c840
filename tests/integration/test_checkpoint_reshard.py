"""Training checkpoints carry the optimizer in the dist checkpoint (Megatron-Core's reshardable
format): a run saved at TP 2 x DP 1 resumes its optimizer at TP 1 x DP 2 and at TP 1 x PP 2.

The demo's cold start (`revisual train`, 2 gloo ranks, fp32, Adam, cosine LR over 6 steps) runs 6
steps at TP 2 with checkpoints at steps 3 and 6. Runs resumed from the step-3 checkpoint:
- at TP 2 (the saved layout): steps 4-6 equal the uninterrupted run bitwise (loss, grad norm);
- at TP 1 x DP 2 and TP 1 x PP 2: within 1e-6 of it (a different layout sums in another order:
  the first resumed step, whose weights are the checkpoint's, already differs by ~1e-7);
- a checkpoint in the old format (format 1: optimizer shards in the per-rank train_state files)
  still resumes bitwise at its layout, and at another layout fails naming what to do.
With `checkpoint.async_save` the run logs the same losses and its checkpoints hold the same
tensors as the synchronous run's, though training went on while they were written.

    .venv/bin/python -m pytest tests/integration/test_checkpoint_reshard.py -s
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "tiny_cpu_demo.yaml"
SFT6 = ["stages=[cold_start]", "cold_start.train_iters=6", "checkpoint.every=3", "checkpoint.keep_last=2",
        "logging.wandb=false"]
TP1_DP2 = ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"]
TP1_PP2 = [*TP1_DP2, "parallel.pipeline_model_parallel_size=2"]


def _train(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_revisual.cli", "train", str(RECIPE), f"output_dir={out}", *SFT6, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"revisual train exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["global_step"]: r for r in rows if "loss" in r}


def _inputs_of(full: Path) -> list[str]:
    """Resumed runs read the first run's tiny model and data (and write their own outputs)."""
    return [f"model.hf_path={full / 'hf_tiny'}", f"cold_start.data.path={full / 'data' / 'sft.jsonl'}"]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reshard") / "full"
    _train(out)
    return out


def _resume(full: Path, out: Path, ckpt: Path, *layout: str, check: bool = True) -> subprocess.CompletedProcess:
    return _train(out, *_inputs_of(full), *layout, "--resume", str(ckpt), check=check)


def test_the_checkpoint_holds_the_optimizer_in_the_dist_checkpoint(full):
    from megatron_revisual.convert.dist_io import DistCheckpointReader

    ckpt = full / "checkpoints" / "iter_0000003"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["checkpoint_format"] == 2
    assert state["layout"] == {"world": 2, "tp": 2, "pp": 1, "cp": 1, "dp": 1}
    keys = set(DistCheckpointReader(ckpt).tensors)
    weight = "language_model.decoder.layers.mlp.linear_fc1.weight"
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        assert f"optimizer.state.{kind}.{weight}" in keys
    # the per-rank files hold only RNG states now
    rank = torch.load(ckpt / "train_state" / "rank_00000.pt", weights_only=False)
    assert set(rank) == {"rng"}


@pytest.mark.parametrize(("name", "layout", "tol"), [
    ("tp2", [], 0.0),
    ("tp1_dp2", TP1_DP2, 1e-6),
    ("tp1_pp2", TP1_PP2, 1e-6),
])
def test_resumed_at_another_layout_the_next_steps_match_the_uninterrupted_run(full, tmp_path, name, layout, tol):
    out = tmp_path / name
    proc = _resume(full, out, full / "checkpoints" / "iter_0000003", *layout)
    ref, got = _rows(full), _rows(out)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        print(f"{name} step {step}: loss {ref[step]['loss']:.9f} / {got[step]['loss']:.9f} "
              f"(|diff| {abs(ref[step]['loss'] - got[step]['loss']):.2e}), grad norm "
              f"{ref[step]['grad_norm']:.7f} / {got[step]['grad_norm']:.7f}, lr {got[step]['lr']:.3e}")
        if tol == 0.0:
            assert got[step]["loss"] == ref[step]["loss"] and got[step]["grad_norm"] == ref[step]["grad_norm"]
        else:
            assert got[step]["loss"] == pytest.approx(ref[step]["loss"], abs=tol)
            assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4)
        assert got[step]["lr"] == ref[step]["lr"]
    resharded = "optimizer state resharded" in proc.stdout + proc.stderr
    assert resharded == bool(layout)


# --- the old format ------------------------------------------------------------------------
def _write_format_1(cfg, new_ckpt: str, old_root: str) -> None:
    """On the saved layout's ranks: the optimizer of `new_ckpt` written the way checkpoints were
    before format 2 (model-only dist checkpoint; per rank the torch optimizer's state dict, the
    stepped parameters' values, the LR schedule and the RNG states)."""
    import dataclasses

    from megatron.core import parallel_state as ps

    from megatron_revisual.config.schema import OptimConfig
    from megatron_revisual.convert.dist_ckpt import load_model_checkpoint
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.train import checkpointing as ck
    from megatron_revisual.train.builders import build_optimizer, wrap_ddp

    new = Path(new_ckpt)
    model = build_qwen25_vl(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    load_model_checkpoint(model, new)
    optim = OptimConfig(**{**dataclasses.asdict(cfg.optim), **cfg.cold_start.optim})
    optimizer, scheduler = build_optimizer(cfg, [wrap_ddp(cfg, model)], optim=optim, decay_steps=6)
    assert ck.restore_training_state(new, model=model, optimizer=optimizer, scheduler=scheduler) is None
    old_optimizer = [
        {"torch_optimizer": opt.optimizer.state_dict(),
         "main_params": [p.detach().clone() for g in opt.optimizer.param_groups for p in g["params"]]}
        for opt in ck._inner_optimizers(optimizer)
    ]
    trainer_state = ck.read_trainer_state(new)
    del trainer_state["checkpoint_format"], trainer_state["layout"]
    ck.save_checkpoint(
        old_root, 3, state=model.sharded_state_dict(), model_cfg=cfg.model, hf_side_dir=None,
        rank_state={"optimizer": old_optimizer, "scheduler": scheduler.state_dict(),
                    "rng": ck.load_rank_state(new)["rng"]},
        trainer_state=trainer_state,
    )


def test_an_old_format_checkpoint_resumes_at_its_layout_and_names_the_way_at_another(full, tmp_path):
    from megatron_revisual.config import load_config
    from megatron_revisual.convert.dist_io import DistCheckpointReader
    from megatron_revisual.parallel import run_distributed

    cfg = load_config(RECIPE, [f"output_dir={full}", *SFT6])
    old_root = tmp_path / "old"
    run_distributed(_write_format_1, world_size=2, tp=2, args=(cfg, str(full / "checkpoints" / "iter_0000003"),
                                                               str(old_root)), timeout_s=300)
    old = old_root / "iter_0000003"
    assert "checkpoint_format" not in json.loads((old / "trainer_state.json").read_text())
    assert not any(k.startswith("optimizer.") for k in DistCheckpointReader(old).tensors)

    same = tmp_path / "same_layout"
    _resume(full, same, old)
    ref, got = _rows(full), _rows(same)
    for step in (4, 5, 6):
        assert got[step]["loss"] == ref[step]["loss"] and got[step]["grad_norm"] == ref[step]["grad_norm"], step

    other = _resume(full, tmp_path / "other_layout", old, *TP1_DP2, check=False)
    assert other.returncode != 0
    assert "old per-rank optimizer format" in other.stderr
    assert "resume it at that layout, let it save once" in other.stderr


# --- async save ----------------------------------------------------------------------------
def test_async_save_writes_the_same_checkpoints_while_training_goes_on(full, tmp_path):
    from megatron_revisual.convert.dist_io import DistCheckpointReader

    out = tmp_path / "async"
    proc = _train(out, *_inputs_of(full), "checkpoint.async_save=true")
    assert (proc.stdout + proc.stderr).count("(writing in the background)") == 2
    ref, got = _rows(full), _rows(out)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert got[step]["loss"] == ref[step]["loss"], step
    for it in ("iter_0000003", "iter_0000006"):
        a, b = DistCheckpointReader(full / "checkpoints" / it), DistCheckpointReader(out / "checkpoints" / it)
        assert set(a.tensors) == set(b.tensors)
        for key, md in a.tensors.items():
            for chunk in md.chunks:
                assert torch.equal(a._load_chunk(key, chunk), b._load_chunk(key, chunk)), (it, key)
        sa = json.loads((full / "checkpoints" / it / "trainer_state.json").read_text())
        sb = json.loads((out / "checkpoints" / it / "trainer_state.json").read_text())
        assert sa == sb
    # and the asynchronously written checkpoint resumes like the synchronous one
    resumed = tmp_path / "from_async"
    _resume(full, resumed, out / "checkpoints" / "iter_0000003")
    assert {s: r["loss"] for s, r in _rows(resumed).items()} == {s: ref[s]["loss"] for s in (4, 5, 6)}
    shutil.rmtree(out)


def _save_before_any_update(cfg, root: str) -> dict:
    """A stage whose every step PAD skipped saves an optimizer that never stepped."""
    from megatron.core import parallel_state as ps

    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.parallel.rng import rng_state
    from megatron_revisual.train import checkpointing as ck
    from megatron_revisual.train.builders import build_optimizer, wrap_ddp

    def fresh():
        model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
        load_hf_weights(model, SafetensorsReader(cfg.model.hf_path), cfg.model,
                        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size())
        optimizer, scheduler = build_optimizer(cfg, [wrap_ddp(cfg, model)])
        return model, optimizer, scheduler

    model, optimizer, scheduler = fresh()
    path = ck.save_checkpoint(root, 0, state=ck.training_state_dict(model, optimizer, scheduler), model_cfg=cfg.model,
                              hf_side_dir=None, rank_state={"rng": rng_state()},
                              trainer_state={"checkpoint_format": 2, "layout": ck.current_layout()})
    model, optimizer, scheduler = fresh()
    ck.restore_training_state(path, model=model, optimizer=optimizer, scheduler=scheduler)
    states = [s for opt in ck._inner_optimizers(optimizer) for s in opt.optimizer.state.values()]
    return {"steps": sorted({float(s["step"]) for s in states}),
            "moments": max(float(s["exp_avg"].abs().max()) for s in states)}


def test_a_stage_saved_before_its_first_update_saves_and_resumes(tmp_path):
    from megatron_revisual.config import load_config
    from megatron_revisual.parallel import run_distributed
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    hf = make_tiny_checkpoint(tmp_path / "hf")
    cfg = load_config(RECIPE, [f"model.hf_path={hf}", *TP1_DP2])
    for got in run_distributed(_save_before_any_update, world_size=2, args=(cfg, str(tmp_path / "ckpt")),
                               timeout_s=300):
        assert got == {"steps": [0.0], "moments": 0.0}
