"""slurm/train.sbatch on a real local Slurm with the real trainer (`revisual train`, tiny CPU recipe).

    .venv/bin/python -m pytest -q tests/integration/launchers/test_slurm_train.py

1. slurm/submit.sh -> sbatch: the recipe runs to completion and leaves checkpoints and HF exports.
2. slurm/convert.sbatch exports its final checkpoint as the trainer's own final HF export.
The real trainer's preemption (USR1, checkpoint, requeue, resume to this run's weights) is proven
on the two-node cluster (test_slurm_two_nodes.py), the batch shell's signal handling on one node by
the stand-in (test_slurm_standin.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from launcher_helpers import (
    REPO,
    sbatch,
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
