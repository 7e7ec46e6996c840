"""Run one rank of a torch.distributed world as one Slurm task (no torchrun).

    srun --ntasks-per-node=8 python -m megatron_revisual.launch.slurm_rank [--chdir DIR] -- \
        python -m megatron_revisual.cli train RECIPE ...

Sets RANK / LOCAL_RANK / WORLD_SIZE from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, MASTER_ADDR
from the first host of the allocation (`scontrol show hostnames`) and MASTER_PORT from the job id,
sets OMP_NUM_THREADS=1 when unset and several ranks share the node (as torchrun does), then
replaces itself with the command (exec). Because the trainer *is* the task, the signals Slurm
sends to job steps (`--signal=USR1@N`) reach it directly and its exit code (75 = stopped,
resumable) becomes srun's; torchrun, in contrast, exits 1 whatever its workers returned, and dies
on SIGUSR1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

PORT_BASE = 20000
PORT_SPAN = 20000


def master_port(job_id: str | None) -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes do not collide;
    REVISUAL_MASTER_PORT wins."""
    if os.environ.get("REVISUAL_MASTER_PORT"):
        return int(os.environ["REVISUAL_MASTER_PORT"])
    return PORT_BASE + int(job_id or 0) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list ("node[01-04]" -> "node01")."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                         capture_output=True, text=True).stdout.split()
    if not out:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} printed no host")
    return out[0]


def _tasks_on_this_node(environ: dict[str, str]) -> str:
    """Tasks of this step on this node. SLURM_STEP_TASKS_PER_NODE lists them per node ("4(x2)",
    "4,3"); the first entry is taken, exact whenever the step spreads its tasks evenly."""
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(key, "")
        if value:
            return value.split(",")[0].split("(")[0]
    return "1"


def rank_env(environ: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables for this Slurm task (raises KeyError outside a step)."""
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST")
               if k not in environ]
    if missing:
        raise KeyError(f"not inside a Slurm job step: {', '.join(missing)} unset")
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": _tasks_on_this_node(environ),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": str(master_port(environ.get("SLURM_JOB_ID"))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_revisual.launch.slurm_rank")
    parser.add_argument("--chdir", help="working directory for the command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    try:
        os.environ.update(rank_env(dict(os.environ)))
    except KeyError as e:
        print(f"slurm_rank: {e.args[0]}", file=sys.stderr)
        return 2
    # What torchrun does with several ranks per node; without it each rank takes every core,
    # and CPU results differ from a torchrun launch (reduction order follows the thread count).
    if "OMP_NUM_THREADS" not in os.environ and int(os.environ["LOCAL_WORLD_SIZE"]) > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
    if args.chdir:
        os.chdir(args.chdir)
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
