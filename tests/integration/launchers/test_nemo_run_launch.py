"""launch_scripts/launch.py (NeMo-Run) with the real trainer on the tiny CPU recipe.

    .venv/bin/python -m pytest -q tests/integration/launchers/test_nemo_run_launch.py

- LocalExecutor: torchrun with 2 gloo ranks on this machine, to completion.
- SlurmExecutor over a LocalTunnel: submitted to the local Slurm (one srun task per rank through
  megatron_revisual.launch.slurm_rank), followed to completion by launch.py.
Both use the same recipe and overrides as the sbatch reference run, so all three launch paths
must end with identical weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launcher_helpers import REPO, RUN_TIMEOUT, TINY_OVERRIDES, TINY_RECIPE, first_divergence

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOTAL_STEPS = 30 + 2 + 1


def _launch(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    # Wide console: NeMo-Run prints through rich, which wraps at the terminal width.
    env = {**env, "COLUMNS": "400"}
    return subprocess.run([sys.executable, "launch_scripts/launch.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("nemo_local")
    out = base / "run"
    env = {**os.environ, "NEMORUN_HOME": str(base / "nemo_home")}
    done = _launch(["--recipe", TINY_RECIPE, "--executor", "local", f"output_dir={out}", *TINY_OVERRIDES],
                   env, RUN_TIMEOUT)
    return {"proc": done, "out": out,
            "done": json.loads((out / "DONE.json").read_text()) if (out / "DONE.json").exists() else None}


def test_local_executor_runs_to_completion(local_run: dict) -> None:
    proc = local_run["proc"]
    assert proc.returncode == 0, f"launch.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "state SUCCEEDED" in proc.stdout
    done = local_run["done"]
    assert done is not None and done["global_step"] == TOTAL_STEPS
    assert (Path(done["hf_export"]) / "config.json").is_file()


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("nemo_slurm")
    out = base / "run"
    env = {**slurm_cluster, "NEMORUN_HOME": str(base / "nemo_home")}
    done = _launch(["--recipe", TINY_RECIPE, "--executor", "slurm", "--job-dir", str(base / "jobs"),
                    "--time", "00:30:00", "--name", "tiny", f"output_dir={out}", *TINY_OVERRIDES],
                   env, RUN_TIMEOUT)
    return {"proc": done, "out": out, "jobs": base / "jobs",
            "done": json.loads((out / "DONE.json").read_text()) if (out / "DONE.json").exists() else None}


def test_slurm_executor_submits_to_local_slurm_and_completes(slurm_run: dict) -> None:
    proc = slurm_run["proc"]
    logs = sorted(slurm_run["jobs"].rglob("*.out"))
    tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in logs)
    assert proc.returncode == 0, f"launch.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}\n{tails}"
    assert "COMPLETED (exit 0:0, requeued 0 times)" in proc.stdout
    done = slurm_run["done"]
    assert done is not None and done["global_step"] == TOTAL_STEPS
    # NeMo-Run's batch script carries the preemption settings and ran one task per rank.
    script = next(slurm_run["jobs"].rglob("*_sbatch.sh")).read_text()
    assert "#SBATCH --signal=USR1@300" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --ntasks-per-node=2" in script
    assert "megatron_revisual.launch.slurm_rank" in script


def test_all_launch_paths_end_with_the_same_weights(local_run: dict, slurm_run: dict,
                                                    sbatch_reference_run: dict) -> None:
    digests = {
        "sbatch + torchrun": (sbatch_reference_run["done"] or {}).get("weights_sha256"),
        "NeMo-Run local (torchrun)": (local_run["done"] or {}).get("weights_sha256"),
        "NeMo-Run Slurm (srun task per rank)": (slurm_run["done"] or {}).get("weights_sha256"),
    }
    assert None not in digests.values(), digests
    ref = sbatch_reference_run["out"]
    assert len(set(digests.values())) == 1, (
        digests, {"local": first_divergence(ref, local_run["out"]), "slurm": first_divergence(ref, slurm_run["out"])})
