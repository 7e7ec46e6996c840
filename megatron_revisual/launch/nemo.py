"""NeMo-Run executors and the training task for a `LaunchPlan` (used by launch_scripts/launch.py).

Two shapes of job:
- local: `LocalExecutor` with the torchrun launcher, G ranks on this machine;
- Slurm: `SlurmExecutor` (LocalTunnel when this machine can run `sbatch`, SSHTunnel otherwise)
  with one srun task per rank (`megatron_revisual.launch.slurm_rank` maps SLURM_PROCID etc. to
  RANK etc. and execs the trainer). Not torchrun here: NeMo-Run's `--signal=USR1@N` goes to every
  process of the job step, torchrun dies on SIGUSR1 and hides its workers' exit codes, whereas a
  trainer that *is* the task turns USR1 into a checkpoint and exits 75, and NeMo-Run's batch
  script then requeues the job (`retries` bounds how often) and the requeued job resumes.
nemo_run is imported lazily so that `--help` and the validation stay fast.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_revisual.launch.plan import LaunchError, LaunchPlan
from megatron_revisual.launch.slurm_jobs import JobInfo, wait_for_job

if TYPE_CHECKING:  # nemo_run is heavy to import; only for annotations
    import nemo_run as run

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(kw_only=True)
class SlurmSettings:
    """Scheduler-side settings of the Slurm executor; None leaves the cluster's default."""

    # NeMo-Run's base directory: experiments/<name>/<id>/ under it holds the sbatch script and the
    # logs (a shared filesystem). With SSH it is the directory on the cluster.
    job_dir: str
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    exclusive: bool = False
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    signal_seconds: int = 300  # USR1 to the ranks this long before the time limit
    max_requeues: int = 20  # NeMo-Run's `retries`: requeues after a non-zero exit (e.g. 75)
    ssh_host: str | None = None  # None: LocalTunnel (sbatch on this machine)
    ssh_user: str | None = None
    ssh_identity: str | None = None


def _split_python_cmd(cmd: tuple[str, ...]) -> tuple[str, list[str]]:
    """(python executable, its arguments) of a trainer command; NeMo-Run needs a python entrypoint."""
    if not cmd or "python" not in Path(cmd[0]).name:
        raise LaunchError(
            f"the trainer command {list(cmd)} (REVISUAL_TRAIN_CMD) must start with a python executable "
            "for NeMo-Run, e.g. '.venv/bin/python -m megatron_revisual.cli train'"
        )
    return cmd[0], list(cmd[1:])


def _script(python: str, args: list[str], env: dict[str, str]) -> run.Script:
    import nemo_run as run

    if args[:1] == ["-m"]:
        return run.Script(path=args[1], args=args[2:], m=True, entrypoint=python, env=env)
    return run.Script(path=args[0], args=args[1:], entrypoint=python, env=env)


def local_train_task(plan: LaunchPlan) -> run.Script:
    """The trainer as a script that torchrun starts once per rank.

    The entrypoint is the literal "python": NeMo-Run then lets torchrun start the ranks with its
    own interpreter (the `torchrun` first on PATH, see `local_executor`) instead of exec'ing the
    entrypoint with --no-python.
    """
    _split_python_cmd(plan.train_cmd)
    return _script("python", [*plan.train_cmd[1:], *plan.trainer_args()], {})


def slurm_train_task(plan: LaunchPlan, *, python: str | None = None, workdir: Path = REPO_ROOT) -> run.Script:
    """The trainer behind `slurm_rank` (one srun task per rank), run in `workdir`."""
    trainer_python, args = _split_python_cmd(plan.train_cmd)
    wrapper = [
        "-m", "megatron_revisual.launch.slurm_rank", "--chdir", str(workdir), "--",
        trainer_python, *args, *plan.trainer_args(),
    ]
    return _script(python or trainer_python, wrapper, {})


def local_executor(plan: LaunchPlan, *, env: dict[str, str] | None = None) -> run.LocalExecutor:
    """torchrun with `gpus_per_node` ranks on this machine (a multi-node plan cannot run locally)."""
    import nemo_run as run

    if plan.nodes != 1:
        raise LaunchError(f"the local executor runs one node; the plan asks for nodes={plan.nodes}")
    # torchx starts `torchrun` from PATH: put this interpreter's bin directory first.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return run.LocalExecutor(ntasks_per_node=plan.gpus_per_node, launcher="torchrun",
                             env_vars={"PATH": path, **(env or {})})


def slurm_executor(plan: LaunchPlan, settings: SlurmSettings, *,
                   env: dict[str, str] | None = None) -> run.SlurmExecutor:
    """One srun task per rank; container, preemption signal and requeue as the settings say."""
    import nemo_run as run

    tunnel: Any
    if settings.ssh_host:
        if not settings.ssh_user:
            raise LaunchError(f"--ssh-host {settings.ssh_host} needs --ssh-user")
        tunnel = run.SSHTunnel(host=settings.ssh_host, user=settings.ssh_user, job_dir=settings.job_dir,
                               identity=settings.ssh_identity)
    else:
        # No copy step for a LocalTunnel: NeMo-Run writes the experiment under its base directory
        # (run_experiment's base_dir) and sbatch reads it there, so both must name the same place.
        tunnel = run.LocalTunnel(job_dir=os.path.join(settings.job_dir, "experiments"))
    mounts = list(settings.container_mounts)
    if settings.container_image:
        # The repository (recipes, outputs, slurm_rank's --chdir) at the same path inside.
        mounts.insert(0, f"{REPO_ROOT}:{REPO_ROOT}")
    extra: dict[str, Any] = {"requeue": True}
    executor = run.SlurmExecutor(
        account=settings.account,
        partition=settings.partition,
        tunnel=tunnel,
        nodes=plan.nodes,
        ntasks_per_node=plan.gpus_per_node,
        gpus_per_node=plan.gpus_per_node if plan.requests_gpus else None,
        exclusive=True if settings.exclusive else None,
        time=settings.time,
        container_image=settings.container_image,
        container_mounts=mounts,
        signal=f"USR1@{settings.signal_seconds}",
        additional_parameters=extra,
        # No code packaging: the job runs the repository in place (shared filesystem or mount).
        packager=run.Packager(),
        retries=settings.max_requeues,
        job_name_prefix="revisual-",
        env_vars=dict(env or {}),
    )
    return executor


def run_experiment(
    name: str,
    task: run.Script,
    executor: Any,
    *,
    dryrun: bool,
    detach: bool,
    base_dir: str | None = None,
) -> Any:
    """Wrap the task in a `run.Experiment`: print the generated job (dryrun) or launch it.

    `base_dir` is NeMo-Run's home for this experiment (default $NEMORUN_HOME); for a Slurm
    LocalTunnel it must be `SlurmSettings.job_dir`. Returns the experiment (its `.jobs` hold the
    handles and states).
    """
    import nemo_run as run

    with run.Experiment(name, executor=executor, log_level="WARN", base_dir=base_dir) as exp:
        exp.add(task, name="train")
        if dryrun:
            exp.dryrun()
        else:
            exp.run(sequential=True, detach=detach, tail_logs=not detach)
    return exp


def wait_for_slurm_job(executor: Any, job_id: str, *, timeout: float = 7 * 24 * 3600, poll: float = 5.0) -> JobInfo:
    """Follow the job through the executor's tunnel (local or SSH) until it ends."""

    def runner(cmd: str) -> tuple[int, str]:
        result = executor.tunnel.run(cmd, warn=True, hide=True)
        return result.return_code, result.stdout

    return wait_for_job(job_id, runner=runner, timeout=timeout, poll=poll)
