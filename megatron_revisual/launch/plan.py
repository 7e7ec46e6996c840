"""What a launcher runs and the check it makes before submitting anything.

    python -m megatron_revisual.launch.plan --recipe configs/qwen25_vl_7b_8xh100.yaml --nodes 2 --gpus-per-node 8

A launch is a recipe, dotted overrides and a shape (nodes x ranks per node). Both launchers
(slurm/submit.sh and launch_scripts/launch.py) build one `LaunchPlan`, validate the recipe at that
shape with the project's own `validate_config` (world size divisible by TP x PP x CP, batch sizes
divisible by micro-batch x DP, ...) and then pass the shape to the trainer as overrides
`cluster.nodes=N cluster.devices_per_node=G cluster.backend=B`, so the trainer and the scheduler
cannot disagree about the world size.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_revisual.config import (
    ConfigError,
    ConfigValidationError,
    RunConfig,
    read_raw_config,
)
from megatron_revisual.config.validate import validate_for_training
from megatron_revisual.prepare import load_config_as_prepared

# The trainer's "stopped, resumable" exit code (EX_TEMPFAIL): it checkpointed on a stop request.
EXIT_STOPPED = 75
BACKENDS = ("gloo", "nccl")


class LaunchError(ValueError):
    """A launch that must not be submitted; the message names the recipe, the shape and the numbers."""


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    """One training launch. `gpus_per_node` is the number of ranks per node; GPUs are requested
    from the scheduler only when the backend is not gloo (gloo ranks are CPU processes)."""

    recipe: str
    overrides: tuple[str, ...] = ()
    nodes: int = 1
    gpus_per_node: int = 1
    backend: str = "nccl"
    resume: str = "auto"
    train_cmd: tuple[str, ...] = field(default_factory=lambda: default_train_cmd())

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def requests_gpus(self) -> bool:
        return self.backend != "gloo"

    def shape_overrides(self) -> list[str]:
        return [
            f"cluster.nodes={self.nodes}",
            f"cluster.devices_per_node={self.gpus_per_node}",
            f"cluster.backend={self.backend}",
        ]

    def trainer_args(self) -> list[str]:
        """Arguments after the trainer command: recipe, user overrides, shape overrides, resume."""
        return [self.recipe, *self.overrides, *self.shape_overrides(), "--resume", self.resume]

    def trainer_argv(self) -> list[str]:
        return [*self.train_cmd, *self.trainer_args()]


def default_train_cmd(python: str | None = None) -> tuple[str, ...]:
    """`$REVISUAL_TRAIN_CMD` (whitespace-separated) or `<python> -m megatron_revisual.cli train`.

    The variable exists so the launcher tests can put a stand-in trainer behind the same scripts;
    on a cluster it can point at a wrapper (profilers, numactl) without editing the launchers.
    """
    override = os.environ.get("REVISUAL_TRAIN_CMD")
    if override:
        return tuple(override.split())  # split as slurm/train.sbatch does (`read -a`)
    return (python or sys.executable, "-m", "megatron_revisual.cli", "train")


def recipe_shape(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[int, int, str]:
    """The recipe's own (nodes, devices_per_node, backend), read without validation, for defaults."""
    try:
        raw = read_raw_config(recipe, list(overrides))
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    cluster = raw.get("cluster") or {}
    return int(cluster.get("nodes", 1)), int(cluster.get("devices_per_node", 1)), str(cluster.get("backend", "auto"))


def make_plan(
    recipe: str,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    backend: str | None = None,
    resume: str = "auto",
    train_cmd: tuple[str, ...] | None = None,
) -> LaunchPlan:
    """A plan with the recipe's cluster section as defaults for what was not given.

    A recipe backend of `auto` becomes `nccl` (a launcher targets GPU nodes unless told `gloo`).
    """
    r_nodes, r_gpus, r_backend = recipe_shape(recipe, overrides)
    chosen = backend or r_backend
    if chosen == "auto":
        chosen = "nccl"
    if chosen not in BACKENDS:
        raise LaunchError(f"backend {chosen!r} (recipe {recipe}) is not one of {list(BACKENDS)}")
    shape_keys = ("cluster.nodes=", "cluster.devices_per_node=", "cluster.backend=")
    given = [o for o in overrides if o.startswith(shape_keys)]
    if given:
        raise LaunchError(
            f"overrides {given} set the launch shape; use --nodes / --gpus-per-node / --backend instead, "
            "so that the scheduler request and the trainer agree"
        )
    return LaunchPlan(
        recipe=recipe,
        overrides=tuple(overrides),
        nodes=nodes if nodes is not None else r_nodes,
        gpus_per_node=gpus_per_node if gpus_per_node is not None else r_gpus,
        backend=chosen,
        resume=resume,
        train_cmd=train_cmd or default_train_cmd(),
    )


def validate_plan(plan: LaunchPlan) -> RunConfig:
    """Load and validate the recipe at the plan's shape; raise LaunchError naming the numbers.

    A recipe whose first run writes its own tiny model (`prepare.tiny_model: true`, the CPU demo)
    has no model.hf_path yet before that run; the check then reads the sizes from the config the
    tiny model will have, written to a temporary directory, and leaves output_dir untouched.
    """
    where = f"recipe {plan.recipe} on {plan.nodes} node(s) x {plan.gpus_per_node} rank(s) per node"
    if plan.nodes < 1 or plan.gpus_per_node < 1:
        raise LaunchError(f"{where}: nodes and ranks per node must be >= 1")
    overrides = [*plan.overrides, *plan.shape_overrides()]
    try:
        cfg = load_config_as_prepared(plan.recipe, overrides)
        validate_for_training(cfg)  # the job is `revisual train`
    except ConfigValidationError as e:
        raise LaunchError(f"{where} does not fit:\n  - " + "\n  - ".join(e.problems)) from None
    except ConfigError as e:
        raise LaunchError(f"{where}: {e}") from None
    if cfg.cluster.backend == "nccl":  # GPUs: the memory plan must fit too (`revisual plan`)
        from megatron_revisual.launch.planner import plan_run

        short = [s for s in plan_run(cfg) if not s.fits]
        if short:
            raise LaunchError(
                f"{where} does not fit in {short[0].gpu_gib:g} GiB GPUs (`revisual plan {plan.recipe}`):\n  - "
                + "\n  - ".join(f"{s.stage}: peak {s.peak_gib:.1f} GiB; to fit: {s.suggestion}" for s in short))
    return cfg


DEFAULT_DATA_ROWS = 64


def check_launch_data(plan: LaunchPlan, cfg: RunConfig, *, rows: int = DEFAULT_DATA_ROWS) -> str:
    """`revisual data` on the first `rows` rows of every source before a job is submitted
    (`train.data_check`); what `prepare` writes at the run's start is left out. Returns the
    report; raises LaunchError naming the failed sections."""
    from megatron_revisual.prepare import prepared_data_dir
    from megatron_revisual.train.data_check import (
        DataSourceError,
        check_data_sources,
        dry_run,
        format_report,
    )

    prepared = prepared_data_dir(read_raw_config(plan.recipe, list(plan.overrides)))
    try:
        notes = check_data_sources(cfg, skip_under=prepared)
    except DataSourceError as e:
        raise LaunchError(f"recipe {plan.recipe}: {e}") from None
    reports = dry_run(cfg, rows=rows, skip_under=prepared)
    text = "".join(f"note: {n}\n" for n in notes) + format_report(reports)
    failed = [r.option for r in reports if not r.ok]
    if failed:
        raise LaunchError(f"recipe {plan.recipe}: the data of {', '.join(failed)} would not train "
                          f"(first {rows} rows; `revisual data {plan.recipe}` for all of them):\n{text}")
    return text


def describe(cfg: RunConfig) -> str:
    p = cfg.parallel
    return (
        f"world {cfg.cluster.world_size} = nodes {cfg.cluster.nodes} x {cfg.cluster.devices_per_node} per node"
        f" = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x "
        f"CP {p.context_parallel_size} x DP {cfg.data_parallel_size}; backend {cfg.cluster.backend}; "
        f"output_dir {cfg.output_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    """Validate a launch and print the layout (or, with --print, one field for shell scripts)."""
    parser = argparse.ArgumentParser(prog="python -m megatron_revisual.launch.plan", description=main.__doc__)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument("--print", dest="field", choices=["output_dir", "shape_overrides"],
                        help="print only this (output_dir: absolute path)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args.recipe, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         backend=args.backend)
        cfg = validate_plan(plan)
    except LaunchError as e:
        print(f"launch check failed: {e}", file=sys.stderr)
        return 2
    if args.field == "output_dir":
        print(Path(cfg.output_dir).absolute())
    elif args.field == "shape_overrides":
        print(" ".join(plan.shape_overrides()))
    else:
        print(f"ok: {plan.recipe}: {describe(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
