"""NeMo-Run entry point: train a recipe locally (torchrun) or on Slurm, after a dry-run check.

    # this machine, 2 CPU ranks (the tiny demo recipe):
    .venv/bin/python launch_scripts/launch.py --recipe configs/tiny_cpu_demo.yaml --executor local
    # Slurm from a login node (LocalTunnel), 2 nodes x 8 GPUs, in a container, preemptible:
    .venv/bin/python launch_scripts/launch.py --recipe configs/qwen25_vl_7b_8xh100.yaml --executor slurm \
        --nodes 2 --gpus-per-node 8 --exclusive --container nvcr.io/nvidia/pytorch:25.01-py3 \
        --partition batch --account myacct --time 04:00:00 optim.lr=1e-6
    # Slurm through SSH from a laptop: add --ssh-host login.cluster --ssh-user me --job-dir /lustre/me/nemo_run
    # print the generated sbatch script / torchrun command and submit nothing: add --dryrun

Every launch first loads the recipe with the requested shape (`cluster.nodes`, `cluster.devices_per_node`,
`cluster.backend` overrides) and validates it; a recipe that does not fit is rejected with the
numbers before NeMo-Run is even imported. Then (not with --dryrun or --no-data-check) the first
--data-rows rows of every data source are read through the training code (`revisual data`): a
missing source or column, or a stage with nothing to train on, is refused before submitting.
Trailing `dotted.key=value` arguments are overrides for the trainer. Relative paths (recipe,
output_dir) are relative to the repository root.
Preemption on Slurm: USR1 reaches the ranks --signal-seconds before the time limit, the trainer
checkpoints and exits 75, NeMo-Run's batch script requeues the job (at most --max-requeues times)
and the requeued job resumes from the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from megatron_revisual.launch.plan import (  # noqa: E402
    BACKENDS,
    DEFAULT_DATA_ROWS,
    LaunchError,
    check_launch_data,
    default_train_cmd,
    describe,
    make_plan,
    validate_plan,
)


def build_parser() -> argparse.ArgumentParser:
    e = os.environ.get
    p = argparse.ArgumentParser(prog="launch_scripts/launch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. configs/tiny_cpu_demo.yaml")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--nodes", type=int, help="default: the recipe's cluster.nodes")
    p.add_argument("--gpus-per-node", type=int,
                   help="ranks per node (GPUs requested unless --backend gloo); "
                        "default: the recipe's cluster.devices_per_node")
    p.add_argument("--backend", choices=BACKENDS, help="default: the recipe's cluster.backend (auto -> nccl)")
    p.add_argument("--container", default=e("REVISUAL_CONTAINER_IMAGE"), help="pyxis/enroot image (slurm)")
    p.add_argument("--container-mounts", default=e("REVISUAL_CONTAINER_MOUNTS", ""),
                   help="extra mounts SRC:DST[,...] (the repository is always mounted at its own path)")
    p.add_argument("--partition", default=e("REVISUAL_PARTITION"))
    p.add_argument("--account", default=e("REVISUAL_ACCOUNT"))
    p.add_argument("--time", default=e("REVISUAL_TIME", "04:00:00"))
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--signal-seconds", type=int, default=300, help="USR1 this long before the time limit")
    p.add_argument("--max-requeues", type=int, default=20, help="requeues after a stop (exit 75) or failure")
    p.add_argument("--job-dir", default=e("REVISUAL_NEMO_JOB_DIR", str(ROOT / "runs" / "nemo_run")),
                   help="NeMo-Run's directory for Slurm jobs (sbatch script, logs under experiments/); "
                   "a shared filesystem; the directory on the cluster with --ssh-host")
    p.add_argument("--ssh-host", default=e("REVISUAL_SSH_HOST"), help="submit through SSH (SSHTunnel)")
    p.add_argument("--ssh-user", default=e("REVISUAL_SSH_USER"))
    p.add_argument("--ssh-identity", default=e("REVISUAL_SSH_IDENTITY"))
    p.add_argument("--name", default="revisual", help="experiment name")
    p.add_argument("--resume", default="auto", help="the trainer's --resume (auto|none|PATH)")
    p.add_argument("--detach", action="store_true", help="return once submitted (default: wait for the end)")
    p.add_argument("--dryrun", action="store_true", help="validate and print the job; launch nothing")
    p.add_argument("--data-rows", type=int, default=DEFAULT_DATA_ROWS,
                   help="before launching, read the first N rows of every data source through the training "
                   "code (`revisual data`); refused if a stage would train on nothing")
    p.add_argument("--no-data-check", action="store_true", help="launch without the data check")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the trainer")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.chdir(ROOT)
    try:
        # Inside a container the trainer runs on the image's own interpreter.
        train_cmd = default_train_cmd("python") if args.container else None
        plan = make_plan(args.recipe, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         backend=args.backend, resume=args.resume, train_cmd=train_cmd)
        cfg = validate_plan(plan)
    except LaunchError as e:
        print(f"launch.py: not launched: {e}", file=sys.stderr)
        return 2
    print(f"launch.py: {plan.recipe}: {describe(cfg)}", flush=True)
    if not (args.dryrun or args.no_data_check):
        try:
            print(check_launch_data(plan, cfg, rows=args.data_rows), end="", flush=True)
        except LaunchError as e:
            print(f"launch.py: not launched: {e}", file=sys.stderr)
            return 2

    from megatron_revisual.launch import nemo

    try:
        if args.executor == "local":
            if args.container:
                raise LaunchError("--container applies to --executor slurm only")
            task, executor = nemo.local_train_task(plan), nemo.local_executor(plan)
        else:
            settings = nemo.SlurmSettings(
                job_dir=str(Path(args.job_dir).absolute()), partition=args.partition, account=args.account,
                time=args.time, exclusive=args.exclusive, container_image=args.container,
                container_mounts=[m for m in args.container_mounts.split(",") if m],
                signal_seconds=args.signal_seconds, max_requeues=args.max_requeues,
                ssh_host=args.ssh_host, ssh_user=args.ssh_user, ssh_identity=args.ssh_identity,
            )
            task, executor = nemo.slurm_train_task(plan), nemo.slurm_executor(plan, settings)
    except LaunchError as e:
        print(f"launch.py: not launched: {e}", file=sys.stderr)
        return 2
    base_dir = None if args.executor == "local" or args.ssh_host else str(Path(args.job_dir).absolute())
    # Slurm jobs are always submitted detached: NeMo-Run's waiting needs sacct (accounting), so
    # this script follows the job with squeue/scontrol through the same tunnel instead.
    detach = args.detach or args.executor == "slurm"
    exp = nemo.run_experiment(args.name, task, executor, dryrun=args.dryrun, detach=detach, base_dir=base_dir)
    if args.dryrun:
        return 0
    job = exp.jobs[0]
    print(f"launch.py: job {job.id}: handle {job.handle} state {job.state}", flush=True)
    if args.executor == "local":
        return 0 if str(job.state).upper().endswith("SUCCEEDED") else 1
    slurm_id = str(job.handle).rstrip("/").rsplit("/", 1)[-1]
    print(f"launch.py: Slurm job {slurm_id}", flush=True)
    if args.detach:
        return 0
    info = nemo.wait_for_slurm_job(executor, slurm_id)
    print(f"launch.py: Slurm job {slurm_id} {info.state} (exit {info.exit_code}, requeued {info.restarts} times)",
          flush=True)
    return 0 if info.state == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
