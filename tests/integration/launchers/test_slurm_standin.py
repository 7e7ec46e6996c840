"""slurm/train.sbatch's signal / requeue logic on the local Slurm, fast, with the STAND-IN trainer
(tests/integration/launchers/standin_trainer.py: fake steps of 1 s, the real trainer's stop
contract). The real trainer's runs are in test_slurm_train.py; these cover the branches that
would cost minutes each there.

    .venv/bin/python -m pytest -q tests/integration/launchers/test_slurm_standin.py
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from launcher_helpers import REPO, read_jsonl, sbatch, wait_for, wait_job

pytestmark = pytest.mark.integration

STANDIN = REPO / "tests" / "integration" / "launchers" / "standin_trainer.py"
ITERS = 8


def _expected_digest(steps: int) -> str:
    """The stand-in's final weights digest: its hash chain over steps 1..N."""
    sys.path.insert(0, str(STANDIN.parent))
    try:
        from standin_trainer import _advance
    finally:
        sys.path.remove(str(STANDIN.parent))
    weights = b"\0" * 32
    for step in range(1, steps + 1):
        weights = _advance(weights, step)
    return hashlib.sha256(weights).hexdigest()


def _submit(slurm_cluster: dict[str, str], tmp_path: Path, name: str) -> tuple[str, Path, Path]:
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    env = {**slurm_cluster, "REVISUAL_LOG_DIR": str(logs), "STANDIN_STEP_SECONDS": "1.0",
           "REVISUAL_TRAIN_CMD": f"{sys.executable} {STANDIN} train"}
    log = logs / f"{name}.out"
    job_id = sbatch([f"--output={log}", f"--job-name={name}", "slurm/train.sbatch", "configs/tiny_cpu_demo.yaml",
                     f"output_dir={out}", f"train.train_iters={ITERS}"], env)
    wait_for(lambda: len(read_jsonl(out / "metrics.jsonl")) >= 2, 120, "two stand-in steps")
    return job_id, out, log


def test_usr1_to_the_batch_shell_checkpoints_requeues_and_resumes(slurm_cluster: dict[str, str],
                                                                  tmp_path: Path) -> None:
    job_id, out, log = _submit(slurm_cluster, tmp_path, "standin-usr1")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, env=slurm_cluster)
    info = wait_job(job_id, 240, log)
    text = log.read_text()
    assert info.state == "COMPLETED" and info.restarts == 1, f"{info}\n{text[-3000:]}"
    attempts = read_jsonl(out / "attempts.jsonl")
    assert [a["restart"] for a in attempts] == [None, "1"]
    stopped_at = attempts[1]["start_step"]
    assert 2 <= stopped_at < ITERS  # resumed mid-run, not from scratch
    # torchrun turned the trainer's 75 into 1; the consumed stop file told the script it was a stop.
    assert "trainer step exited with 1" in text and "requeueing job" in text
    done = (out / "DONE.json").read_text()
    assert _expected_digest(ITERS) in done
    assert not (tmp_path / "logs" / f"stop-{job_id}").exists()


def test_term_checkpoints_but_does_not_requeue(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    """scancel (SIGTERM to the batch shell and the step): the trainer checkpoints, nothing requeues."""
    job_id, out, log = _submit(slurm_cluster, tmp_path, "standin-term")
    subprocess.run(["scancel", job_id], check=True, env=slurm_cluster)
    info = wait_job(job_id, 120, log)
    assert info.state == "CANCELLED" and info.restarts == 0, info
    wait_for(lambda: (out / "checkpoints" / "latest_checkpointed_iteration.txt").exists(), 30,
             "the stop checkpoint")
    step = int((out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= step < ITERS
    assert not (out / "DONE.json").exists()
    assert len(read_jsonl(out / "attempts.jsonl")) == 1
