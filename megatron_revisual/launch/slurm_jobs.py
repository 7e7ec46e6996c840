"""Follow a Slurm job to its end with squeue / scontrol (sacct only as a fallback).

    python -m megatron_revisual.launch.slurm_jobs JOBID [--timeout 3600]   # prints the final state

NeMo-Run's own waiting asks `sacct`, which needs the accounting database; many small clusters
(and the local test cluster) run without it. squeue sees a job until it ends (a requeued job is
PENDING again, so waiting continues through preemption); scontrol still knows a finished job for
MinJobAge seconds, which is where the final state and exit code are read.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# (command) -> (exit code, stdout); a NeMo-Run tunnel's `run` fits behind it for SSH.
Runner = Callable[[str], tuple[int, str]]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def local_runner(cmd: str) -> tuple[int, str]:
    done = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
    return done.returncode, done.stdout


@dataclass(frozen=True)
class JobInfo:
    state: str  # e.g. RUNNING, PENDING, COMPLETED; UNKNOWN when no tool knows the job
    exit_code: str  # "rc:signal" as Slurm prints it; "" when unknown
    restarts: int


def job_info(job_id: str, runner: Runner = local_runner) -> JobInfo:
    rc, out = runner(f"scontrol show job {job_id} --oneliner")
    if rc == 0 and "JobState=" in out:
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return JobInfo(fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", ""),
                       int(fields.get("Restarts", "0") or 0))
    rc, out = runner(f"sacct -X -n -P -j {job_id} -o State,ExitCode")
    if rc == 0 and out.strip():
        state, _, code = out.strip().splitlines()[0].partition("|")
        return JobInfo(state.split()[0], code, 0)
    return JobInfo("UNKNOWN", "", 0)


def wait_for_job(job_id: str, *, runner: Runner = local_runner, timeout: float = 3600,
                 poll: float = 5.0) -> JobInfo:
    """Block until the job reaches a final state; raise TimeoutError naming it otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id, runner)
        if info.state in FINAL_STATES:
            return info
        if info.state == "UNKNOWN":
            # Gone from squeue/scontrol and no accounting: it ended longer than MinJobAge ago.
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"Slurm job {job_id} still {info.state} after {timeout:.0f} s")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_revisual.launch.slurm_jobs")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    info = wait_for_job(args.job_id, timeout=args.timeout)
    print(f"{args.job_id} {info.state} exit {info.exit_code} restarts {info.restarts}")
    return 0 if info.state == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
