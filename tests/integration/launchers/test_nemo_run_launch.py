"""launch_scripts/launch.py (NeMo-Run) with the real trainer on the tiny CPU recipe.

    .venv/bin/python -m pytest -q tests/integration/launchers/test_nemo_run_launch.py

- LocalExecutor: torchrun with 2 gloo ranks on this machine, to completion.
It uses the same recipe and overrides as the sbatch reference run and must end with its weights.
NeMo-Run's SlurmExecutor over a LocalTunnel (one srun task per rank through
megatron_revisual.launch.slurm_rank, followed to completion by launch.py) runs on the two-node
cluster, to the same weights: test_slurm_two_nodes.py.
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


def test_local_executor_ends_with_the_sbatch_weights(local_run: dict, sbatch_reference_run: dict) -> None:
    digests = {
        "sbatch + torchrun": (sbatch_reference_run["done"] or {}).get("weights_sha256"),
        "NeMo-Run local (torchrun)": (local_run["done"] or {}).get("weights_sha256"),
    }
    assert None not in digests.values(), digests
    assert len(set(digests.values())) == 1, (digests, first_divergence(sbatch_reference_run["out"], local_run["out"]))
