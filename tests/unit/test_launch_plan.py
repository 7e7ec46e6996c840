"""The launchers' dry-run check: a recipe validated at nodes x ranks before anything is submitted.

    .venv/bin/python -m pytest -q tests/unit/test_launch_plan.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron_revisual.launch.plan import LaunchError, default_train_cmd, make_plan, validate_plan

REPO = Path(__file__).resolve().parents[2]
RECIPE_7B = str(REPO / "configs" / "qwen25_vl_7b_8xh100.yaml")  # TP=4, global batch 128, micro 1
TINY = str(REPO / "configs" / "tiny_cpu_demo.yaml")


def test_defaults_come_from_the_recipe() -> None:
    plan = make_plan(RECIPE_7B)
    assert (plan.nodes, plan.gpus_per_node, plan.backend, plan.world_size) == (1, 8, "nccl", 8)
    assert plan.requests_gpus
    assert plan.shape_overrides() == ["cluster.nodes=1", "cluster.devices_per_node=8", "cluster.backend=nccl"]


def test_world_not_divisible_by_model_parallel_is_rejected_with_the_numbers() -> None:
    with pytest.raises(LaunchError) as e:
        validate_plan(make_plan(RECIPE_7B, nodes=1, gpus_per_node=6))
    msg = str(e.value)
    assert "on 1 node(s) x 6 rank(s) per node does not fit" in msg
    assert ("world size 6 (cluster.nodes=1 x cluster.devices_per_node=6) is not divisible by "
            "TP x PP x CP = 4 x 1 x 1 = 4" in msg)


def test_batch_not_divisible_by_data_parallel_is_rejected_with_the_numbers() -> None:
    # 3 nodes x 8 = 24 ranks, TP 4 -> DP 6; 128 % (1 x 6) = 2.
    with pytest.raises(LaunchError) as e:
        validate_plan(make_plan(RECIPE_7B, nodes=3, gpus_per_node=8))
    assert ("train.global_batch_size=128 is not divisible by train.micro_batch_size=1 x data-parallel size 6"
            in str(e.value))


def test_a_fitting_shape_validates_to_that_world() -> None:
    cfg = validate_plan(make_plan(RECIPE_7B, ["optim.lr=2e-6"], nodes=2, gpus_per_node=8))
    assert cfg.cluster.world_size == 16 and cfg.data_parallel_size == 4
    assert cfg.optim.lr == 2e-6


def test_shape_overrides_are_refused_in_favour_of_the_flags() -> None:
    with pytest.raises(LaunchError, match=r"\['cluster.nodes=2'\] set the launch shape"):
        make_plan(RECIPE_7B, ["cluster.nodes=2"])


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(LaunchError, match=r"backend 'mpi'.*\['gloo', 'nccl'\]"):
        make_plan(RECIPE_7B, backend="mpi")


def test_tiny_recipe_validates_before_its_model_exists_and_writes_nothing(tmp_path: Path) -> None:
    """The CPU demo writes its tiny model on the first run; the dry run must work before that."""
    out = tmp_path / "run"
    plan = make_plan(TINY, [f"output_dir={out}"])
    assert (plan.gpus_per_node, plan.backend, plan.requests_gpus) == (2, "gloo", False)
    cfg = validate_plan(plan)
    assert cfg.model.hf_path == f"{out}/hf_tiny"  # the path the trainer will write, not the stand-in's
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert not out.exists()
    with pytest.raises(LaunchError, match="world size 3 .* TP x PP x CP = 2 x 1 x 1 = 2"):
        validate_plan(make_plan(TINY, [f"output_dir={out}"], gpus_per_node=3))


def test_trainer_command_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVISUAL_TRAIN_CMD", raising=False)
    assert default_train_cmd() == (sys.executable, "-m", "megatron_revisual.cli", "train")
    plan = make_plan(RECIPE_7B, ["optim.lr=2e-6"], nodes=2, resume="none")
    assert plan.trainer_argv() == [
        sys.executable, "-m", "megatron_revisual.cli", "train", RECIPE_7B, "optim.lr=2e-6",
        "cluster.nodes=2", "cluster.devices_per_node=8", "cluster.backend=nccl", "--resume", "none",
    ]
    monkeypatch.setenv("REVISUAL_TRAIN_CMD", "/opt/py -m wrapper train")
    assert make_plan(RECIPE_7B).train_cmd == ("/opt/py", "-m", "wrapper", "train")
