"""NeMo-Run launcher: the executors and tasks it builds, and the dry-run scripts it prints.

    .venv/bin/python -m pytest -q tests/unit/test_launch_nemo.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nemo_run as run
import pytest

from megatron_revisual.launch import nemo
from megatron_revisual.launch.plan import LaunchError, make_plan

REPO = Path(__file__).resolve().parents[2]
RECIPE_7B = str(REPO / "configs" / "qwen25_vl_7b_8xh100.yaml")
TINY = str(REPO / "configs" / "tiny_cpu_demo.yaml")
IMAGE = "nvcr.io/nvidia/pytorch:25.01-py3"


@pytest.fixture(autouse=True)
def _default_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVISUAL_TRAIN_CMD", raising=False)


def test_slurm_executor_carries_container_signal_and_requeue(tmp_path: Path) -> None:
    plan = make_plan(RECIPE_7B, nodes=2, gpus_per_node=8)
    settings = nemo.SlurmSettings(job_dir=str(tmp_path), partition="batch", exclusive=True, container_image=IMAGE,
                                  container_mounts=["/data:/data"], signal_seconds=120, max_requeues=5)
    ex = nemo.slurm_executor(plan, settings)
    assert (ex.nodes, ex.ntasks_per_node, ex.gpus_per_node, ex.exclusive) == (2, 8, 8, True)
    assert ex.signal == "USR1@120" and ex.additional_parameters == {"requeue": True} and ex.retries == 5
    assert ex.container_image == IMAGE and ex.container_mounts == [f"{REPO}:{REPO}", "/data:/data"]
    assert isinstance(ex.tunnel, run.LocalTunnel) and ex.tunnel.job_dir == str(tmp_path / "experiments")
    assert type(ex.packager) is run.Packager  # the repository runs in place, nothing is copied


def test_slurm_executor_for_cpu_ranks_and_over_ssh(tmp_path: Path) -> None:
    plan = make_plan(TINY)
    settings = nemo.SlurmSettings(job_dir="/lustre/me/nemo", ssh_host="login.example", ssh_user="me")
    ex = nemo.slurm_executor(plan, settings)
    assert ex.gpus_per_node is None and ex.ntasks_per_node == 2 and ex.container_mounts == []
    assert isinstance(ex.tunnel, run.SSHTunnel) and ex.tunnel.host == "login.example"
    with pytest.raises(LaunchError, match="needs --ssh-user"):
        nemo.slurm_executor(plan, nemo.SlurmSettings(job_dir="/x", ssh_host="login.example"))


def test_tasks_run_the_trainer_with_the_shape_overrides() -> None:
    plan = make_plan(TINY, ["mrl.steps=2"])
    local = nemo.local_train_task(plan)
    assert (local.path, local.m, local.entrypoint) == ("megatron_revisual.cli", True, "python")
    assert local.args == ["train", TINY, "mrl.steps=2", "cluster.nodes=1", "cluster.devices_per_node=2",
                          "cluster.backend=gloo", "--resume", "auto"]
    slurm = nemo.slurm_train_task(plan)
    assert (slurm.path, slurm.m, slurm.entrypoint) == ("megatron_revisual.launch.slurm_rank", True, sys.executable)
    assert slurm.args[:3] == ["--chdir", str(REPO), "--"]
    assert slurm.args[3:8] == [sys.executable, "-m", "megatron_revisual.cli", "train", TINY]
    ex = nemo.local_executor(plan)
    assert (ex.ntasks_per_node, ex.launcher) == (2, "torchrun")
    assert ex.env_vars["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    with pytest.raises(LaunchError, match="runs one node; the plan asks for nodes=2"):
        nemo.local_executor(make_plan(RECIPE_7B, nodes=2))


def test_non_python_trainer_command_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVISUAL_TRAIN_CMD", "/usr/bin/env revisual train")
    with pytest.raises(LaunchError, match="must start with a python executable"):
        nemo.local_train_task(make_plan(TINY))


def _launch_dryrun(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400", "NEMORUN_HOME": str(tmp_path / "home")}
    env.pop("REVISUAL_TRAIN_CMD", None)
    return subprocess.run([sys.executable, "launch_scripts/launch.py", *args, "--dryrun"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


def test_launch_dryrun_prints_the_sbatch_script_with_container_signal_and_requeue(tmp_path: Path) -> None:
    done = _launch_dryrun("--recipe", "configs/qwen25_vl_7b_8xh100.yaml", "--executor", "slurm", "--nodes", "2",
                          "--gpus-per-node", "8", "--container", IMAGE, "--exclusive", "--job-dir", str(tmp_path),
                          "optim.lr=2e-6", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "world 16 = nodes 2 x 8 per node = TP 4 x PP 1 x CP 1 x DP 4; backend nccl" in text
    for line in ("#SBATCH --requeue", "#SBATCH --signal=USR1@300", "#SBATCH --exclusive", "#SBATCH --nodes=2",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "export TORCHX_MAX_RETRIES=20"):
        assert line in text, line
    flat = " ".join(text.split())  # rich wraps the long srun line even on a wide console
    assert f"--container-image {IMAGE}" in flat and f"--container-mounts {REPO}:{REPO}" in flat
    # Inside the container: the image's python, one task per rank through slurm_rank.
    assert (f"python -m megatron_revisual.launch.slurm_rank --chdir {REPO} -- python -m megatron_revisual.cli train "
            "configs/qwen25_vl_7b_8xh100.yaml optim.lr=2e-6 cluster.nodes=2 cluster.devices_per_node=8 "
            "cluster.backend=nccl --resume auto") in flat


def test_launch_dryrun_local_uses_torchrun(tmp_path: Path) -> None:
    done = _launch_dryrun("--recipe", "configs/tiny_cpu_demo.yaml", "--executor", "local",
                          f"output_dir={tmp_path / 'run'}", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    flat = " ".join(done.stdout.replace("'", " ").replace(",", " ").split())
    assert "torchrun" in flat and "--nproc-per-node 2" in flat and "-m megatron_revisual.cli train" in flat


def test_launch_rejects_a_recipe_that_does_not_fit(tmp_path: Path) -> None:
    done = _launch_dryrun("--recipe", "configs/qwen25_vl_7b_8xh100.yaml", "--executor", "slurm", "--nodes", "1",
                          "--gpus-per-node", "6", tmp_path=tmp_path)
    assert done.returncode == 2
    assert ("world size 6 (cluster.nodes=1 x cluster.devices_per_node=6) is not divisible by TP x PP x CP = "
            "4 x 1 x 1 = 4") in done.stderr
    assert "SBATCH" not in done.stdout
