"""Validate a training launch, create its log directory, then `sbatch slurm/train.sbatch`.

    bash slurm/submit.sh [options] RECIPE [dotted.overrides ...]
    python -m megatron_revisual.launch.sbatch --nodes 2 --gpus-per-node 8 --exclusive \
        --container nvcr.io/nvidia/pytorch:25.01-py3 configs/qwen25_vl_7b_8xh100.yaml --dryrun
    bash slurm/submit.sh --backend gloo --gpus-per-node 2 configs/tiny_cpu_demo.yaml output_dir=runs/x

Before submitting (not with --dryrun or --no-data-check) the first --data-rows rows of every
data source are read through the training code (`revisual data`): a missing source or column,
or a stage with nothing to train on, is refused with exit 2. `#SBATCH --output` cannot create
directories, so this wrapper makes the log directory before submitting and points --output
there. It prints the job id (with --dryrun: the layout, the environment and the exact sbatch
command, and submits nothing). Options default to environment variables so a site can set them
once: REVISUAL_PARTITION, REVISUAL_ACCOUNT, REVISUAL_TIME, REVISUAL_CONTAINER_IMAGE,
REVISUAL_CONTAINER_MOUNTS, REVISUAL_LOG_DIR.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_revisual.launch.plan import (
    BACKENDS,
    DEFAULT_DATA_ROWS,
    LaunchError,
    LaunchPlan,
    check_launch_data,
    describe,
    make_plan,
    validate_plan,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "slurm" / "train.sbatch"
DEFAULT_SIGNAL_SECONDS = 300


@dataclass(kw_only=True)
class SbatchOptions:
    """Scheduler-side settings; None leaves the choice to the cluster's defaults."""

    job_name: str = "revisual-train"
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    exclusive: bool = False
    container_image: str | None = None
    container_mounts: str | None = None
    log_dir: Path = field(default_factory=lambda: REPO_ROOT / "runs" / "slurm")
    signal_seconds: int = DEFAULT_SIGNAL_SECONDS  # USR1 to the batch shell this long before the limit
    requeue: bool = True
    extra: tuple[str, ...] = ()


def sbatch_command(plan: LaunchPlan, opts: SbatchOptions, *,
                   root: Path = REPO_ROOT) -> tuple[list[str], dict[str, str]]:
    """The sbatch argv and the environment variables train.sbatch reads for this launch."""
    argv = ["sbatch", "--parsable", f"--job-name={opts.job_name}", f"--nodes={plan.nodes}",
            "--ntasks-per-node=1", f"--output={opts.log_dir / '%x-%j.out'}"]
    if plan.requests_gpus:
        argv.append(f"--gpus-per-node={plan.gpus_per_node}")
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("time", opts.time)):
        if value:
            argv.append(f"--{flag}={value}")
    if opts.exclusive:
        argv.append("--exclusive")
    if opts.requeue:
        argv += ["--requeue", f"--signal=B:USR1@{opts.signal_seconds}"]
    else:
        argv.append("--no-requeue")
    argv += [*opts.extra, str(root / "slurm" / "train.sbatch"), plan.recipe, *plan.overrides]
    env = {
        "REVISUAL_ROOT": str(root),
        "REVISUAL_GPUS_PER_NODE": str(plan.gpus_per_node),
        "REVISUAL_BACKEND": plan.backend,
        "REVISUAL_LOG_DIR": str(opts.log_dir),
        "REVISUAL_RESUME": plan.resume,
    }
    if opts.container_image:
        env["REVISUAL_CONTAINER_IMAGE"] = opts.container_image
        if opts.container_mounts:
            env["REVISUAL_CONTAINER_MOUNTS"] = opts.container_mounts
    return argv, env


def build_parser() -> argparse.ArgumentParser:
    e = os.environ.get
    p = argparse.ArgumentParser(prog="slurm/submit.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="YAML recipe under configs/")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the trainer, e.g. optim.lr=1e-6")
    p.add_argument("--nodes", type=int, help="default: the recipe's cluster.nodes")
    p.add_argument("--gpus-per-node", type=int,
                   help="ranks per node (GPUs requested unless --backend gloo); "
                        "default: the recipe's cluster.devices_per_node")
    p.add_argument("--backend", choices=BACKENDS, help="default: the recipe's cluster.backend (auto -> nccl)")
    p.add_argument("--partition", default=e("REVISUAL_PARTITION"))
    p.add_argument("--account", default=e("REVISUAL_ACCOUNT"))
    p.add_argument("--time", default=e("REVISUAL_TIME"), help="time limit, e.g. 04:00:00")
    p.add_argument("--exclusive", action="store_true", help="whole nodes")
    p.add_argument("--container", default=e("REVISUAL_CONTAINER_IMAGE"), help="pyxis/enroot image")
    p.add_argument("--container-mounts", default=e("REVISUAL_CONTAINER_MOUNTS"),
                   help="extra mounts SRC:DST[,...] (the repository is always mounted at its own path)")
    p.add_argument("--log-dir", type=Path, default=Path(e("REVISUAL_LOG_DIR", str(REPO_ROOT / "runs" / "slurm"))))
    p.add_argument("--job-name", default="revisual-train")
    p.add_argument("--signal-seconds", type=int, default=DEFAULT_SIGNAL_SECONDS,
                   help="USR1 this many seconds before the time limit: checkpoint and requeue")
    p.add_argument("--no-requeue", action="store_true", help="no preemption signal, no requeue")
    p.add_argument("--resume", default="auto", help="the trainer's --resume (auto|none|PATH)")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch flag (repeatable)")
    p.add_argument("--dryrun", action="store_true", help="validate and print the sbatch command; submit nothing")
    p.add_argument("--data-rows", type=int, default=DEFAULT_DATA_ROWS,
                   help="before submitting, read the first N rows of every data source through the training "
                   "code (`revisual data`); refused if a stage would train on nothing")
    p.add_argument("--no-data-check", action="store_true", help="submit without the data check")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args.recipe, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         backend=args.backend, resume=args.resume)
        cfg = validate_plan(plan)
    except LaunchError as e:
        print(f"submit: not submitted: {e}", file=sys.stderr)
        return 2
    opts = SbatchOptions(
        job_name=args.job_name, partition=args.partition, account=args.account, time=args.time,
        exclusive=args.exclusive, container_image=args.container, container_mounts=args.container_mounts,
        log_dir=args.log_dir.absolute(), signal_seconds=args.signal_seconds, requeue=not args.no_requeue,
        extra=tuple(args.sbatch_arg),
    )
    cmd, env = sbatch_command(plan, opts)
    print(f"submit: {plan.recipe}: {describe(cfg)}", file=sys.stderr)
    if not (args.dryrun or args.no_data_check):
        try:
            print(check_launch_data(plan, cfg, rows=args.data_rows), end="", file=sys.stderr)
        except LaunchError as e:
            print(f"submit: not submitted: {e}", file=sys.stderr)
            return 2
    if args.dryrun:
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " \\")
        print("  " + shlex.join(cmd))
        return 0
    # Created here because #SBATCH --output cannot create directories.
    opts.log_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"submit: sbatch failed ({done.returncode}): {done.stderr.strip()}", file=sys.stderr)
        return done.returncode
    job_id = done.stdout.strip().split(";")[0]
    print(f"submit: job {job_id}, log {opts.log_dir}/{opts.job_name}-{job_id}.out", file=sys.stderr)
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
