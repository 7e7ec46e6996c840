"""A real single-node Slurm cluster for the launcher tests, started once per test session.

    .venv/bin/python -m pytest -q tests/integration/launchers

`slurm/local_cluster.sh start` installs Debian's slurm-wlm + munge when missing (root, apt),
writes its own slurm.conf under REVISUAL_SLURM_DIR and waits until the node is idle. When the
cluster cannot be started the Slurm tests fail in CI (CI=true) and skip elsewhere, naming the
reason. A cluster that was already running is used and left running; one started here is
stopped at the end of the session.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from launcher_helpers import (
    CLUSTER_SCRIPT,
    REPO,
    RUN_TIMEOUT,
    TINY_OVERRIDES,
    TINY_RECIPE,
    wait_job,
)


def _cluster(cmd: str, timeout: float, nodes: int = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), cmd], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "REVISUAL_SLURM_NODES": str(nodes)})


def _start_or_fail(nodes: int) -> bool:
    """Start the cluster; True when it was already running. Fails in CI, skips elsewhere."""
    was_running = _cluster("status", 30, nodes).returncode == 0
    try:
        started = _cluster("start", 600, nodes)  # apt-get install on a fresh machine takes ~30 s
        problem = None if started.returncode == 0 else (started.stderr or started.stdout).strip()[-2000:]
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        message = (f"local {nodes}-node Slurm cluster (REVISUAL_SLURM_NODES={nodes} slurm/local_cluster.sh start) "
                   f"did not start: {problem}")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return was_running


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """The environment (SLURM_CONF set) under which sbatch/squeue/scontrol reach the cluster."""
    was_running = _start_or_fail(1)
    conf = _cluster("env", 30).stdout.strip().removeprefix("export SLURM_CONF=")
    previous = os.environ.get("SLURM_CONF")
    # Set for the whole session: NeMo-Run's LocalTunnel runs sbatch with this process's environment.
    os.environ["SLURM_CONF"] = conf
    try:
        yield {**os.environ, "SLURM_CONF": conf}
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not was_running:
            _cluster("stop", 120)


@pytest.fixture(scope="session")
def sbatch_reference_run(slurm_cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny recipe through slurm/submit.sh -> sbatch slurm/train.sbatch, uninterrupted.

    Shared by the sbatch tests and, as the reference weights, by the preemption and NeMo-Run tests.
    """
    base = tmp_path_factory.mktemp("sbatch_reference")
    out, logs = base / "run", base / "logs"
    done = subprocess.run(
        ["bash", "slurm/submit.sh", "--log-dir", str(logs), "--job-name", "ref", TINY_RECIPE,
         f"output_dir={out}", *TINY_OVERRIDES],
        cwd=REPO, env=slurm_cluster, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"submit.sh failed ({done.returncode}):\n{done.stderr}"
    job_id = done.stdout.strip()
    log = logs / f"ref-{job_id}.out"
    info = wait_job(job_id, RUN_TIMEOUT, log)
    return {"job_id": job_id, "info": info, "out": out, "log": log, "submit_stderr": done.stderr,
            "done": json.loads((out / "DONE.json").read_text()) if (out / "DONE.json").exists() else None}


@pytest.fixture(scope="session")
def two_node_cluster() -> Iterator[dict[str, str]]:
    """Two slurmd in network namespaces of their own (slurm/local_cluster.sh, REVISUAL_SLURM_NODES=2):
    the environment whose SLURM_CONF reaches it. This process's SLURM_CONF stays the one-node
    cluster's, so every Slurm command for this cluster takes the returned environment."""
    was_running = _start_or_fail(2)
    conf = _cluster("env", 30, 2).stdout.strip().removeprefix("export SLURM_CONF=")
    try:
        yield {**os.environ, "SLURM_CONF": conf}
    finally:
        if not was_running:
            _cluster("stop", 120, 2)
