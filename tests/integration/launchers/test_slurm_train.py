"""slurm/train.sbatch on a real local Slurm with the real trainer (`revisual train`, tiny CPU recipe).

    .venv/bin/python -m pytest -q tests/integration/launchers/test_slurm_train.py

1. slurm/submit.sh -> sbatch: the recipe runs to completion and leaves checkpoints and HF exports.
2. Preemption: `sbatch slurm/train.sbatch` directly, `scancel --signal=USR1 --batch` while the
   cold-start stage runs; the batch shell asks the trainer to stop, it checkpoints and exits, the
   job requeues itself, the requeued run resumes from that checkpoint and ends with the same
   weights as the uninterrupted run (DONE.json weights_sha256).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from launcher_helpers import (
    REPO,
    RUN_TIMEOUT,
    TINY_OVERRIDES,
    TINY_RECIPE,
    first_divergence,
    read_jsonl,
    sbatch,
    wait_for,
    wait_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ["cold_start", "mrl", "trl"]
COLD_START_ITERS = 30  # from TINY_OVERRIDES
TOTAL_STEPS = 30 + 2 + 1  # cold_start.train_iters + mrl.steps + trl.steps


def test_sbatch_runs_tiny_recipe_to_completion(sbatch_reference_run: dict) -> None:
    run = sbatch_reference_run
    log_text = run["log"].read_text() if run["log"].exists() else "(no log)"
    assert run["info"].state == "COMPLETED", f"job {run['job_id']}: {run['info']}\n{log_text[-4000:]}"
    assert run["info"].exit_code == "0:0"
    assert run["info"].restarts == 0
    # submit.sh validated the recipe at the shape it submitted.
    assert "world 2 = nodes 1 x 2 per node = TP 2 x PP 1 x CP 1 x DP 1; backend gloo" in run["submit_stderr"]
    out: Path = run["out"]
    done = run["done"]
    assert done is not None, log_text[-4000:]
    assert done["global_step"] == TOTAL_STEPS
    assert re.fullmatch(r"[0-9a-f]{64}", done["weights_sha256"])
    assert done["hf_export"] == str(out / "hf" / "trl")
    for stage in STAGES:  # one HF export per stage
        hf = out / "hf" / stage
        assert (hf / "config.json").is_file(), f"no HF export for stage {stage} in {hf}"
        assert list(hf.glob("*.safetensors")), f"no safetensors in {hf}"
    ckpts = out / "checkpoints"
    latest = int((ckpts / "latest_checkpointed_iteration.txt").read_text().strip())
    assert latest == TOTAL_STEPS
    assert (ckpts / f"iter_{TOTAL_STEPS:07d}").is_dir()
    # The job ran torchrun with the shape the launcher passed.
    assert "--nproc-per-node=2" in log_text and "cluster.devices_per_node=2" in log_text


@pytest.fixture(scope="module")
def preempted_run(slurm_cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("sbatch_preempted")
    out, logs = base / "run", base / "logs"
    logs.mkdir()
    env = {**slurm_cluster, "REVISUAL_LOG_DIR": str(logs)}
    log = logs / "preempted.out"
    job_id = sbatch([f"--output={log}", "--job-name=preempt", "slurm/train.sbatch", TINY_RECIPE,
                     f"output_dir={out}", *TINY_OVERRIDES], env)

    def cold_start_running() -> bool:
        rows = read_jsonl(out / "metrics.jsonl")
        return any(r.get("stage") == "cold_start" and "loss" in r for r in rows)

    try:
        wait_for(cold_start_running, 600, "the first cold_start step in metrics.jsonl")
    except AssertionError:
        subprocess.run(["scancel", job_id], capture_output=True)
        raise AssertionError(f"no cold_start step; log:\n{log.read_text()[-4000:] if log.exists() else ''}") from None
    signalled_at = max(r["global_step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r)
    sent = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, capture_output=True, text=True)
    assert sent.returncode == 0, sent.stderr
    info = wait_job(job_id, RUN_TIMEOUT, log)
    return {"job_id": job_id, "info": info, "out": out, "log": log, "signalled_at": signalled_at,
            "done": json.loads((out / "DONE.json").read_text()) if (out / "DONE.json").exists() else None}


def test_preemption_checkpoints_requeues_and_resumes(preempted_run: dict) -> None:
    run = preempted_run
    log = run["log"].read_text()
    assert run["info"].state == "COMPLETED", f"{run['info']}\n{log[-4000:]}"
    assert run["info"].restarts == 1, f"expected exactly one requeue: {run['info']}"
    assert "USR1 (preemption warning)" in log
    assert f"requeueing job {run['job_id']}" in log
    assert f"job {run['job_id']} restart 1" in log  # the second attempt ran the same script
    # The stop landed in the cold-start stage, and the second attempt resumed from its checkpoint.
    resumed = re.search(r"resuming from (\S+) \(stage (\w+), step (\d+), global step (\d+)\)", log)
    assert resumed, f"no 'resuming from' in the job log:\n{log[-4000:]}"
    stage, step = resumed.group(2), int(resumed.group(4))
    assert stage == "cold_start"
    assert run["signalled_at"] <= step < COLD_START_ITERS, (run["signalled_at"], step)
    assert Path(resumed.group(1)).name == f"iter_{step:07d}"
    assert run["done"] is not None and run["done"]["global_step"] == TOTAL_STEPS


def test_preempted_run_ends_with_the_uninterrupted_weights(preempted_run: dict, sbatch_reference_run: dict) -> None:
    assert sbatch_reference_run["done"] is not None and preempted_run["done"] is not None
    assert preempted_run["done"]["weights_sha256"] == sbatch_reference_run["done"]["weights_sha256"], (
        first_divergence(sbatch_reference_run["out"], preempted_run["out"]))


def test_convert_sbatch_exports_the_final_checkpoint(slurm_cluster: dict[str, str], sbatch_reference_run: dict,
                                                     tmp_path: Path) -> None:
    """slurm/convert.sbatch mcore-to-hf on the trained run's final checkpoint gives the trainer's
    own final HF export, tensor for tensor."""
    from safetensors.numpy import load_file

    ref_out: Path = sbatch_reference_run["out"]
    assert sbatch_reference_run["done"] is not None
    hf_out = tmp_path / "hf_converted"
    log = tmp_path / "convert.out"
    job_id = sbatch([f"--output={log}", "slurm/convert.sbatch", "mcore-to-hf",
                     "--ckpt", str(ref_out / "checkpoints"), "--out", str(hf_out)], slurm_cluster)
    info = wait_job(job_id, 600, log)
    assert info.state == "COMPLETED", f"{info}\n{log.read_text()[-4000:]}"

    def tensors(d: Path) -> dict:
        merged: dict = {}
        for f in sorted(d.glob("*.safetensors")):
            merged.update(load_file(str(f)))
        return merged

    got, want = tensors(hf_out), tensors(Path(sbatch_reference_run["done"]["hf_export"]))
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape and (got[name] == want[name]).all(), name


def test_repo_relative_paths_are_used(sbatch_reference_run: dict) -> None:
    """The job ran from the repository root (REVISUAL_ROOT) with the repository's venv."""
    log = sbatch_reference_run["log"].read_text()
    assert str(REPO / ".venv" / "bin" / "python") in log
