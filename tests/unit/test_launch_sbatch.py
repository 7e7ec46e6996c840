"""The sbatch launcher's dry runs: slurm/submit.sh's sbatch command and slurm/train.sbatch's srun line.

    .venv/bin/python -m pytest -q tests/unit/test_launch_sbatch.py

No Slurm is needed: submit.sh --dryrun submits nothing, and train.sbatch with REVISUAL_DRYRUN=1
prints its srun command instead of running it (the SLURM_* variables a job would have are set
by the test).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from megatron_revisual.launch.plan import make_plan
from megatron_revisual.launch.sbatch import SbatchOptions, sbatch_command

REPO = Path(__file__).resolve().parents[2]
RECIPE_7B = "configs/qwen25_vl_7b_8xh100.yaml"
IMAGE = "nvcr.io/nvidia/pytorch:25.01-py3"


def test_sbatch_command_for_a_preemptible_gpu_job_in_a_container(tmp_path: Path) -> None:
    plan = make_plan(str(REPO / RECIPE_7B), ["optim.lr=2e-6"], nodes=2, gpus_per_node=8)
    opts = SbatchOptions(partition="batch", account="acct", time="04:00:00", exclusive=True,
                         container_image=IMAGE, container_mounts="/data:/data", log_dir=tmp_path / "logs",
                         signal_seconds=120)
    argv, env = sbatch_command(plan, opts, root=REPO)
    assert argv[:6] == ["sbatch", "--parsable", "--job-name=revisual-train", "--nodes=2", "--ntasks-per-node=1",
                        f"--output={tmp_path / 'logs' / '%x-%j.out'}"]
    for flag in ("--gpus-per-node=8", "--partition=batch", "--account=acct", "--time=04:00:00", "--exclusive",
                 "--requeue", "--signal=B:USR1@120"):
        assert flag in argv, flag
    assert argv[-3:] == [str(REPO / "slurm" / "train.sbatch"), str(REPO / RECIPE_7B), "optim.lr=2e-6"]
    assert env["REVISUAL_CONTAINER_IMAGE"] == IMAGE and env["REVISUAL_CONTAINER_MOUNTS"] == "/data:/data"
    assert (env["REVISUAL_GPUS_PER_NODE"], env["REVISUAL_BACKEND"]) == ("8", "nccl")


def test_sbatch_command_for_cpu_ranks_requests_no_gpus(tmp_path: Path) -> None:
    plan = make_plan(str(REPO / "configs" / "tiny_cpu_demo.yaml"))
    argv, env = sbatch_command(plan, SbatchOptions(log_dir=tmp_path, requeue=False), root=REPO)
    assert not [a for a in argv if a.startswith("--gpus")]
    assert "--no-requeue" in argv and not [a for a in argv if a.startswith("--signal")]
    assert "REVISUAL_CONTAINER_IMAGE" not in env and env["REVISUAL_GPUS_PER_NODE"] == "2"


def _submit_dryrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "slurm/submit.sh", *args, "--dryrun"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_submit_dryrun_prints_container_signal_and_requeue(tmp_path: Path) -> None:
    done = _submit_dryrun("--nodes", "2", "--gpus-per-node", "8", "--exclusive", "--container", IMAGE,
                          "--log-dir", str(tmp_path / "logs"), RECIPE_7B)
    assert done.returncode == 0, done.stderr
    assert "world 16 = nodes 2 x 8 per node = TP 4 x PP 1 x CP 1 x DP 4" in done.stderr
    assert f"REVISUAL_CONTAINER_IMAGE={IMAGE}" in done.stdout
    command = shlex.split(done.stdout.splitlines()[-1])
    assert "--signal=B:USR1@300" in command and "--requeue" in command and "--exclusive" in command
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing


def test_submit_rejects_a_recipe_that_does_not_fit() -> None:
    done = _submit_dryrun("--nodes", "1", "--gpus-per-node", "6", RECIPE_7B)
    assert done.returncode == 2
    assert ("world size 6 (cluster.nodes=1 x cluster.devices_per_node=6) is not divisible by "
            "TP x PP x CP = 4 x 1 x 1 = 4" in done.stderr)
    assert "sbatch" not in done.stdout


def _train_sbatch_dryrun(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    job = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node1",
           "SLURM_SUBMIT_DIR": str(REPO), "REVISUAL_DRYRUN": "1"}
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "REVISUAL_"))}
    return subprocess.run(["bash", "slurm/train.sbatch", *args], cwd=REPO, env={**full, **job, **env},
                          capture_output=True, text=True, timeout=120)


def test_train_sbatch_runs_torchrun_per_node_in_the_container(tmp_path: Path) -> None:
    done = _train_sbatch_dryrun({"REVISUAL_CONTAINER_IMAGE": IMAGE, "REVISUAL_CONTAINER_MOUNTS": "/data:/data",
                                 "REVISUAL_GPUS_PER_NODE": "8", "REVISUAL_LOG_DIR": str(tmp_path)},
                                RECIPE_7B, "optim.lr=2e-6")
    assert done.returncode == 0, done.stderr
    srun = shlex.split(done.stdout.splitlines()[-1].removeprefix("train.sbatch: "))
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert f"--container-image={IMAGE}" in srun
    assert f"--container-mounts={REPO}:{REPO},/data:/data" in srun and f"--container-workdir={REPO}" in srun
    # torchrun on each node: 8 ranks, 2 nodes, the node rank read from SLURM_NODEID inside the task.
    assert "--nproc-per-node=8" in srun and "--nnodes=2" in srun and "--master-port=21234" in srun
    assert '--node-rank="$SLURM_NODEID"' in srun[srun.index("-c") + 1]
    tail = srun[srun.index("--no-python") + 1:]
    assert tail == ["python", "-m", "megatron_revisual.cli", "train", RECIPE_7B, "optim.lr=2e-6", "cluster.nodes=2",
                    "cluster.devices_per_node=8", "cluster.backend=nccl", "--resume", "auto"]
    assert f"stop file {tmp_path}/stop-1234" in done.stdout


def test_train_sbatch_validates_the_recipe_at_the_allocation_shape(tmp_path: Path) -> None:
    """Without a container the batch script checks the recipe before starting any rank."""
    env = {"REVISUAL_LOG_DIR": str(tmp_path), "REVISUAL_GPUS_PER_NODE": "3"}
    done = _train_sbatch_dryrun(env, RECIPE_7B)
    assert done.returncode == 2
    assert ("world size 6 (cluster.nodes=2 x cluster.devices_per_node=3) is not divisible by "
            "TP x PP x CP = 4 x 1 x 1 = 4" in done.stderr)
    ok = _train_sbatch_dryrun({"REVISUAL_LOG_DIR": str(tmp_path)}, RECIPE_7B)  # 8 per node: the recipe's
    assert ok.returncode == 0, ok.stderr
    assert "cluster.devices_per_node=8" in ok.stdout and str(REPO / ".venv" / "bin" / "python") in ok.stdout
