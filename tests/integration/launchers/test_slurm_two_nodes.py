"""A multi-node job on a real two-node Slurm (slurm/local_cluster.sh, REVISUAL_SLURM_NODES=2: two
slurmd in network namespaces of their own, nodes rvnode1 / rvnode2 over a bridge).

    .venv/bin/python -m pytest -q tests/integration/launchers/test_slurm_two_nodes.py

One job, the tiny recipe with TINY_OVERRIDES at 2 nodes x 1 rank (the world the one-node reference
run, sbatch_reference_run, has as 1 node x 2 ranks), through slurm/submit.sh:
1. attempt 1 is preempted (USR1 to the batch shell, `scancel --signal=USR1 --batch`) in the cold
   start: the batch shell asks the trainer to stop, it checkpoints, the job requeues itself (the
   one-node path of this is the stand-in's test, test_slurm_standin.py);
2. attempt 2 resumes on both nodes; mid-step every process of the job on rvnode2 (its torchrun
   agent and its rank) is frozen with SIGSTOP: a node that stops answering without closing a
   socket, which nothing in torch or Slurm notices before the collective timeout. Rank 0's
   heartbeat watchdog (parallel/liveness.py) must end it within 2 minutes, naming rank 1 on
   rvnode2, and the batch script requeue the job;
3. attempt 3 resumes from the last complete checkpoint on both nodes and completes with the
   one-node reference run's weights (DONE.json weights_sha256).
A SIGKILL of a node's torchrun alone is seen by Slurm itself (srun --kill-on-bad-exit ends the
step in seconds) and needs no watchdog.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launcher_helpers import (
    REPO,
    RUN_TIMEOUT,
    TINY_OVERRIDES,
    TINY_RECIPE,
    first_divergence,
    read_jsonl,
    wait_for,
    wait_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PEER_TIMEOUT_S = 30
COLD_START_ITERS = 30  # from TINY_OVERRIDES
TOTAL_STEPS = COLD_START_ITERS + 2 + 1


def _job_pids_in(netns: str, job_id: str) -> list[int]:
    """The job's processes inside a node's network namespace (slurmstepd excluded)."""
    listed = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout
    pids = []
    for pid in map(int, listed.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in env and b"slurmstepd" not in cmd:
            pids.append(pid)
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _diagnostics(out: Path, env: dict[str, str]) -> str:
    """The ranks' and the cluster daemons' log tails, for a failure message."""
    daemons = Path(env["SLURM_CONF"]).parent / "log"
    paths = sorted((out / "logs").glob("rank*.log")) + sorted(daemons.glob("slurm*.log"))
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in paths if p.exists())


def _steps(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def test_two_nodes_preempted_then_a_frozen_node_resume_to_the_one_node_weights(
        two_node_cluster: dict[str, str], sbatch_reference_run: dict, tmp_path: Path) -> None:
    env = {**two_node_cluster, "OMP_NUM_THREADS": "1"}  # as torchrun sets it on the one-node reference
    out, logs = tmp_path / "run", tmp_path / "logs"
    done = subprocess.run(
        ["bash", "slurm/submit.sh", "--nodes", "2", "--gpus-per-node", "1", "--backend", "gloo",
         "--log-dir", str(logs), "--job-name", "two", TINY_RECIPE, f"output_dir={out}", *TINY_OVERRIDES,
         f"cluster.peer_timeout_s={PEER_TIMEOUT_S}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"submit.sh failed ({done.returncode}):\n{done.stderr}"
    assert "world 2 = nodes 2 x 1 per node" in done.stderr
    job_id = done.stdout.strip()
    log = logs / f"two-{job_id}.out"
    frozen: list[int] = []
    try:
        # 1. preempted in the cold start
        wait_for(lambda: len(_steps(out)) >= 1, 600, "attempt 1's first step")
        signalled_at = max(r["global_step"] for r in _steps(out))
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
        wait_for(lambda: f"job {job_id} restart 1" in (log.read_text() if log.exists() else ""), 300,
                 "the requeued attempt 2")
        # 2. attempt 2 trains a step past its resume point, then rvnode2 freezes
        resumed_steps = len(_steps(out))
        wait_for(lambda: len(_steps(out)) >= resumed_steps + 2, 600, "two steps of attempt 2")
        frozen = _job_pids_in("rvn2", job_id)
        assert frozen, "no process of the job in rvnode2's namespace"
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        frozen_at = time.time()
        lost_file = logs / f"lost-{job_id}"
        wait_for(lambda: "lost rank(s) [1]" in log.read_text(), 150, "the survivor naming the frozen node")
        # A lost node does not come back: once the survivor has named it, its processes go. Left
        # stopped, they outlive SIGTERM for KillWait (30 s) on every kill of job 8 on rvnode2, and
        # slurmd, blocked in that kill, misses slurmctld's RPCs; the retried terminate then reached
        # the requeued attempt (same job id) on rvnode2 and killed it (CI, 2026-12-07).
        _kill(frozen)
        wait_for(lambda: f"job {job_id} restart 2" in log.read_text(), 240, "the requeue after the lost node")
        info = wait_job(job_id, RUN_TIMEOUT, log, env=env)
    finally:
        _kill(frozen)
        subprocess.run(["scancel", job_id], env=env, capture_output=True)
    text = log.read_text()
    assert info.state == "COMPLETED" and info.restarts == 2, f"{info}\n{text[-4000:]}\n{_diagnostics(out, env)}"
    # both nodes ran their rank in every attempt
    for attempt in range(3):
        assert f"job {job_id} restart {attempt} on 2 node(s) x 1 rank(s), master rvnode1:" in text
    assert text.count("node 0 (rvnode1) runs ranks 0..0") == 3 and text.count("node 1 (rvnode2) runs ranks 1..1") == 3
    # the lost node was named by the survivor within 2 minutes, and the job requeued
    lost = re.search(r"lost rank\(s\) \[1\] on host\(s\) rvnode2: no heartbeat for 30 s", text)
    assert lost, text[-4000:]
    assert "train.sbatch: a rank lost its peers:" in text
    assert not lost_file.exists()  # consumed by the attempt that requeued
    detected = min(float(json.loads(line.split("lost its peers: ", 1)[1])["time"])
                   for line in text.splitlines() if "a rank lost its peers: {" in line)
    print(f"frozen node named after {detected - frozen_at:.1f} s (peer timeout {PEER_TIMEOUT_S} s)")
    assert PEER_TIMEOUT_S - 6 <= detected - frozen_at <= 120
    # the preemption: the batch shell passed USR1 on, the trainer checkpointed in the cold start
    # and the job requeued itself; attempts 2 and 3 each resumed from a checkpoint on both nodes
    assert "USR1 (preemption warning)" in text and f"requeueing job {job_id}" in text
    resumes = re.findall(r"resuming from (\S+) \(stage (\w+), step \d+, global step (\d+)\)", text)
    assert len(resumes) == 2, resumes
    path, stage, step = resumes[0][0], resumes[0][1], int(resumes[0][2])
    assert stage == "cold_start" and signalled_at <= step < COLD_START_ITERS, (resumes, signalled_at)
    assert Path(path).name == f"iter_{step:07d}"
    result = json.loads((out / "DONE.json").read_text())
    assert result["global_step"] == TOTAL_STEPS
    assert result["weights_sha256"] == sbatch_reference_run["done"]["weights_sha256"], (
        first_divergence(sbatch_reference_run["out"], out))


def test_nemo_run_slurm_executor_runs_the_job_on_both_nodes(two_node_cluster: dict[str, str],
                                                            sbatch_reference_run: dict, tmp_path: Path) -> None:
    """launch_scripts/launch.py --executor slurm --nodes 2: NeMo-Run's SlurmExecutor (LocalTunnel)
    submits one srun task per rank (launch.slurm_rank) to the two-node cluster; same weights."""
    out = tmp_path / "run"
    env = {**two_node_cluster, "NEMORUN_HOME": str(tmp_path / "nemo_home"), "COLUMNS": "400", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "launch_scripts/launch.py", "--recipe", TINY_RECIPE, "--executor", "slurm", "--nodes", "2",
         "--gpus-per-node", "1", "--backend", "gloo", "--job-dir", str(tmp_path / "jobs"), "--time", "00:30:00",
         "--name", "two", f"output_dir={out}", *TINY_OVERRIDES],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    logs = sorted((tmp_path / "jobs").rglob("*.out"))
    tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in logs)
    assert done.returncode == 0, (
        f"launch.py failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}\n{tails}")
    assert "COMPLETED (exit 0:0, requeued 0 times)" in done.stdout
    script = next((tmp_path / "jobs").rglob("*_sbatch.sh")).read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    # NeMo-Run's batch script carries the preemption settings and runs one task per rank
    assert "#SBATCH --signal=USR1@300" in script and "#SBATCH --requeue" in script
    assert "megatron_revisual.launch.slurm_rank" in script
    ranks = sorted((out / "logs").glob("rank*.log"))
    assert [p.name for p in ranks] == ["rank0.log", "rank1.log"]
    result = json.loads((out / "DONE.json").read_text())
    assert result["weights_sha256"] == sbatch_reference_run["done"]["weights_sha256"], (
        first_divergence(sbatch_reference_run["out"], out))
