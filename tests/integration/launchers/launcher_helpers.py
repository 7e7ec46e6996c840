"""Shared helpers and constants of the launcher tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from megatron_revisual.launch.slurm_jobs import JobInfo, wait_for_job

REPO = Path(__file__).resolve().parents[3]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"

# The tiny CPU recipe made short (the trainer's own "short overrides", with a cold-start stage
# long enough, ~15 s, to be interrupted reliably). Every real run in these tests uses exactly these,
# so all of them must end with the same weights.
TINY_RECIPE = "configs/tiny_cpu_demo.yaml"
TINY_OVERRIDES = [
    "cold_start.train_iters=30", "mrl.steps=2", "trl.steps=1", "checkpoint.every=10",
    "mrl.validation.every=0", "logging.wandb=false",
]
RUN_TIMEOUT = 900.0



def sbatch(args: list[str], env: dict[str, str], cwd: Path = REPO) -> str:
    """Submit and return the job id (stderr in the assertion message on failure)."""
    done = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"sbatch {args} failed: {done.stderr}"
    return done.stdout.strip().split(";")[0]


def wait_job(job_id: str, timeout: float, log: Path | None = None, env: dict[str, str] | None = None) -> JobInfo:
    """Follow the job on the cluster `env` points at (SLURM_CONF; default this process's)."""
    def runner(cmd: str) -> tuple[int, str]:
        done = subprocess.run(cmd.split(), capture_output=True, text=True, env=env)
        return done.returncode, done.stdout

    try:
        return wait_for_job(job_id, runner=runner, timeout=timeout, poll=1.0)
    except TimeoutError:
        subprocess.run(["scancel", job_id], capture_output=True, env=env)
        tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
        raise AssertionError(f"Slurm job {job_id} did not finish in {timeout} s; log tail:\n{tail}") from None


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]




def first_divergence(reference_out: Path, other_out: Path) -> str:
    """Where two runs' metrics.jsonl first differ (for the message of a weights mismatch)."""
    def steps(out: Path) -> dict:
        return {(r.get("stage"), r.get("global_step")): r for r in read_jsonl(out / "metrics.jsonl")
                if "event" not in r}

    ref, other = steps(reference_out), steps(other_out)
    for key in sorted(ref, key=lambda k: k[1] or 0):
        a, b = ref[key], other.get(key)
        if b is None:
            return f"step {key} missing in {other_out}/metrics.jsonl"
        diff = {k: (a[k], b.get(k)) for k in a
                if not k.startswith("time") and isinstance(a[k], int | float) and a[k] != b.get(k)}
        if diff:
            return f"first differing step {key} (reference, other): {dict(list(diff.items())[:5])}"
    return "metrics.jsonl rows are identical"
