"""One Slurm task per rank: SLURM_* -> torch.distributed variables, then exec of the trainer.

    .venv/bin/python -m pytest -q tests/unit/test_launch_slurm_rank.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_revisual.launch.slurm_jobs import job_info
from megatron_revisual.launch.slurm_rank import master_port, rank_env

SLURM_TASK = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
              "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456", "MASTER_ADDR": "gpu07"}


def test_rank_env_maps_the_slurm_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVISUAL_MASTER_PORT", raising=False)
    assert rank_env(SLURM_TASK) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                                    "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}
    with pytest.raises(KeyError, match="SLURM_PROCID"):
        rank_env({k: v for k, v in SLURM_TASK.items() if k != "SLURM_PROCID"})


def test_master_port_follows_the_job_and_can_be_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVISUAL_MASTER_PORT", raising=False)
    assert (master_port("7"), master_port("20007"), master_port(None)) == (20007, 20007, 20000)
    monkeypatch.setenv("REVISUAL_MASTER_PORT", "29500")
    assert master_port("7") == 29500


def test_wrapper_execs_the_command_with_the_rank_variables(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **SLURM_TASK}
    env.pop("REVISUAL_MASTER_PORT", None)
    env.pop("OMP_NUM_THREADS", None)
    probe = ("import json, os; print(json.dumps({k: os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', "
             "'MASTER_ADDR', 'MASTER_PORT', 'OMP_NUM_THREADS')} | {'cwd': os.getcwd()}))")
    done = subprocess.run([sys.executable, "-m", "megatron_revisual.launch.slurm_rank", "--chdir", str(tmp_path),
                           "--", sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu07",
                                       "MASTER_PORT": "23456", "OMP_NUM_THREADS": "1", "cwd": str(tmp_path)}
    # exec: the command's exit code is the task's (75 = stopped, resumable, reaches srun).
    code = subprocess.run([sys.executable, "-m", "megatron_revisual.launch.slurm_rank", "--", sys.executable, "-c",
                           "raise SystemExit(75)"], env=env, timeout=60).returncode
    assert code == 75


def test_job_info_reads_scontrol_then_falls_back_to_sacct() -> None:
    # A stand-in for the scheduler's commands: the parsing is what is tested here (the real
    # commands run in tests/integration/launchers).
    scontrol = ("JobId=42 JobName=revisual-train UserId=root(0) JobState=COMPLETED Reason=None "
                "Requeue=1 Restarts=1 BatchFlag=1 ExitCode=0:0 RunTime=00:01:05")
    answers = {"scontrol": (0, scontrol), "sacct": (1, "")}
    info = job_info("42", lambda cmd: answers[cmd.split()[0]])
    assert (info.state, info.exit_code, info.restarts) == ("COMPLETED", "0:0", 1)
    answers = {"scontrol": (1, "slurm_load_jobs error: Invalid job id specified"), "sacct": (0, "FAILED|1:0\n")}
    info = job_info("42", lambda cmd: answers[cmd.split()[0]])
    assert (info.state, info.exit_code) == ("FAILED", "1:0")
