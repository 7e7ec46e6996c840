"""`revisual train`: the staged ReVisual-R1 curriculum as one command, with exact resume.

    # CPU (spawns cluster.nodes x devices_per_node gloo ranks itself): the tiny demo, ~10 min
    .venv/bin/revisual train configs/tiny_cpu_demo.yaml
    .venv/bin/revisual train configs/tiny_cpu_demo.yaml mrl.steps=4 --resume auto
    # GPUs: one process per GPU under torchrun (what slurm/train.sbatch and launch_scripts/ do)
    torchrun --nproc-per-node 8 -m megatron_revisual.cli train configs/qwen25_vl_7b_8xh100.yaml

The stages a config lists (`stages: [cold_start, mrl, trl]`) run in order. The first starts
from `model.hf_path`; each later one from the previous stage's final checkpoint. At the end of a
stage the policy is exported as an HF model to <output_dir>/hf/<stage> and checkpointed.

Resume (`--resume auto`, the default) continues from the newest complete checkpoint under
<output_dir>/checkpoints: model, optimizer shard, LR schedule, data position, RNG states,
stage and step; a run stopped and resumed ends with the weights of an uninterrupted run.
A stop request (the file <output_dir>/STOP or $REVISUAL_STOP_FILE, which SIGUSR1/SIGTERM
create) is honoured after the current step: checkpoint, delete the file, exit 75.
A finished run leaves <output_dir>/DONE.json (final step, weights digest, HF export).
One trainer per output_dir: a second one is refused, naming the first (`train.run_lock`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from megatron_revisual.logfiles import (
    VERBOSE_ENV,
    console,
    ignore_known_warnings,
    redirect_stdio,
    warnings_to_console,
)

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; resume to continue
DONE_FILE = "DONE.json"

__all__ = ["EXIT_STOPPED", "add_train_arguments", "prepare_inputs", "run_train"]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe, e.g. configs/tiny_cpu_demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mrl.steps=4")
    parser.add_argument(
        "--resume", default="auto",
        help="auto: the newest complete checkpoint under <output_dir>/checkpoints, if any; "
        "none: start fresh (refused when checkpoints exist); or a checkpoint directory",
    )
    parser.add_argument(
        "--verbose", action="store_true",
        help="print the ranks' and the rollout engine's own logs (Megatron-Core, torch, vLLM) on the "
        "console too; by default they go to <output_dir>/logs/",
    )


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _install_stop_signals(stop_file: Path) -> None:
    """SIGUSR1 / SIGTERM become a stop request, honoured at the next step boundary."""

    def request_stop(signum: int, _frame: Any) -> None:
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.touch()
        print(f"revisual train: got signal {signum}; stopping after the current step", file=console())

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, request_stop)


def prepare_inputs(raw: dict[str, Any]) -> None:
    """Lock the run's directories (`train.run_lock`: one trainer per output_dir), then write
    what `prepare` asks for and is missing (`megatron_revisual.prepare`)."""
    from megatron_revisual.prepare import write_prepared_inputs
    from megatron_revisual.train.run_lock import claim_run_dirs

    claim_run_dirs(raw)
    write_prepared_inputs(raw, lambda message: print(f"revisual train: {message}", file=console()))


def _load(args: argparse.Namespace, *, prepare: bool):
    from megatron_revisual.config import config_from_dict, read_raw_config, validate_config
    from megatron_revisual.config.validate import validate_for_training

    raw = read_raw_config(args.config, args.overrides)
    if prepare:
        prepare_inputs(raw)
    cfg = config_from_dict(raw, source=str(args.config) + (" + overrides" if args.overrides else ""))
    validate_config(cfg)
    validate_for_training(cfg)
    return cfg


def _check_data(cfg: Any) -> None:
    """Every stage's data sources exist, are readable and have the named columns
    (`train.data_check.check_data_sources`; raises a one-line ConfigError)."""
    from megatron_revisual.train.data_check import check_data_sources

    check_data_sources(cfg)


def _already_done(out: Path, resume: str, *, say: bool = True) -> bool:
    """A finished run (DONE.json) is not run again unless --resume none asks for a fresh one."""
    if (out / DONE_FILE).exists() and resume != "none":
        if say:
            print(f"revisual train: {out / DONE_FILE} exists; the run is complete", file=console())
        return True
    return False


def run_train(args: argparse.Namespace) -> int:
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # inherited by the ranks and the engine process
    if _under_torchrun():
        return _torchrun_main(args)
    cfg = _load(args, prepare=True)
    out = Path(cfg.output_dir)
    if _already_done(out, args.resume):
        return 0
    _check_data(cfg)  # before any rank starts: a missing source is one line, exit 2
    from megatron_revisual.parallel import run_distributed
    from megatron_revisual.train.checkpointing import stop_file_path

    _install_stop_signals(stop_file_path(out))

    p = cfg.parallel
    results = run_distributed(
        train_rank,
        world_size=cfg.cluster.world_size,
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        cp=p.context_parallel_size,
        vpp=p.virtual_pipeline_model_parallel_size,
        seed=cfg.train.seed,
        args=(cfg, args.resume),
        timeout_s=30 * 24 * 3600.0,
        stdio_path=str(out / "logs" / "rank{rank}.log"),
    )
    return 0 if results[0] == "done" else EXIT_STOPPED


def _torchrun_main(args: argparse.Namespace) -> int:
    """One rank of a torchrun world: rank 0 prepares inputs while the others wait."""
    import torch
    import torch.distributed as dist

    from megatron_revisual.config import read_raw_config
    from megatron_revisual.parallel import initialize_parallel
    from megatron_revisual.parallel.liveness import start_peer_watchdog

    raw = read_raw_config(args.config, args.overrides)
    backend = (raw.get("cluster") or {}).get("backend", "auto")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    if dist.get_rank() == 0:
        prepare_inputs(raw)
    dist.barrier()
    cfg = _load(args, prepare=False)
    _check_data(cfg)  # every rank, before Megatron starts: they all fail alike
    if dist.get_world_size() != cfg.cluster.world_size:
        raise ValueError(
            f"torchrun started {dist.get_world_size()} ranks but the config asks for cluster.nodes="
            f"{cfg.cluster.nodes} x cluster.devices_per_node={cfg.cluster.devices_per_node}; "
            "pass matching cluster.* overrides"
        )
    out = Path(cfg.output_dir)
    if _already_done(out, args.resume, say=dist.get_rank() == 0):
        dist.destroy_process_group()
        return 0
    redirect_stdio(out / "logs" / f"rank{dist.get_rank()}.log")
    from megatron_revisual.train.checkpointing import stop_file_path

    _install_stop_signals(stop_file_path(out))
    p = cfg.parallel
    initialize_parallel(
        tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
        cp=p.context_parallel_size, vpp=p.virtual_pipeline_model_parallel_size, seed=cfg.train.seed,
    )
    watchdog = start_peer_watchdog(cfg.cluster.peer_timeout_s)
    try:
        status = train_rank(cfg, args.resume)
    except BaseException:
        # the traceback went to this rank's log file; the job's console must say where
        print(f"revisual train: rank {dist.get_rank()} failed; see {out / 'logs'}/rank{dist.get_rank()}.log\n"
              f"{traceback.format_exc()}", file=console(), flush=True)
        raise
    dist.barrier()
    if watchdog is not None:
        watchdog.leave()
    dist.destroy_process_group()
    return 0 if status == "done" else EXIT_STOPPED


# ---------------------------------------------------------------------------------------------
# Inside every rank


def _resume_point(cfg: Any, resume: str) -> Path | None:
    from megatron_revisual.train.checkpointing import checkpoint_root, find_latest

    root = checkpoint_root(cfg)
    if resume == "auto":
        return find_latest(root)
    if resume == "none":
        if find_latest(root) is not None:
            raise FileExistsError(
                f"--resume none but {root} holds checkpoints; delete them or use --resume auto"
            )
        return None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete training checkpoint (no trainer_state.json)")
    return path


def train_rank(cfg: Any, resume: str) -> str:
    """Run (the rest of) the curriculum on this rank; "done" or "stopped"."""
    import torch
    import torch.distributed as dist

    ignore_known_warnings(on_gpu=torch.cuda.is_available())
    if dist.get_rank() == 0:
        warnings_to_console()  # skipped rows, a config that does less than it says

    from megatron_revisual.train.checkpointing import read_trainer_state
    from megatron_revisual.train.stages import StageRunner

    start = _resume_point(cfg, resume)
    state = read_trainer_state(start) if start is not None else None
    first = 0
    if state is not None:
        first = cfg.stages.index(state["stage"]) + (1 if state["stage_complete"] else 0)
        if dist.get_rank() == 0:
            print(f"revisual train: resuming from {start} (stage {state['stage']}, step "
                  f"{state['stage_step']}, global step {state['global_step']})", file=console())
    runner = StageRunner(cfg, resume_state=state, resume_dir=start)
    checks = None
    if cfg.rehearsal.collective_checks:
        from megatron_revisual.parallel.collective_checks import CollectiveChecks

        checks = CollectiveChecks.install(cfg.rehearsal)
        runner.step_hooks.append(checks.end_of_step)
    try:
        for name in cfg.stages[first:]:
            mid_stage = state is not None and state["stage"] == name and not state["stage_complete"]
            if runner.run_stage(name, resume=mid_stage) == "stopped":
                return "stopped"
        if runner.final_export is None:  # resumed after the last stage's end checkpoint
            runner.final_export = Path(cfg.output_dir) / "hf" / cfg.stages[-1]
        digest, export = runner.final_digest, runner.final_export
        if dist.get_rank() == 0:
            done = {
                "global_step": runner.global_step,
                "weights_sha256": digest,
                "hf_export": str(Path(export).absolute()),  # DONE.json is read from anywhere
                "stages": list(cfg.stages),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            path = Path(cfg.output_dir) / DONE_FILE
            tmp = path.with_name(f".{DONE_FILE}.tmp")
            tmp.write_text(json.dumps(done, indent=2) + "\n")
            os.replace(tmp, path)
            _report(Path(cfg.output_dir))
            print(f"revisual train: done; final HF model in {export}", file=console())
        return "done"
    finally:
        runner.close()
        if checks is not None:
            checks.uninstall()
        if cfg.rehearsal.collective_checks:
            _write_rank_usage(Path(cfg.output_dir))


def _write_rank_usage(out: Path) -> None:
    """This rank's peak resident memory, for the rehearsal's summary (rehearsal/rank<N>.json)."""
    import resource

    import torch.distributed as dist

    path = out / "rehearsal" / f"rank{dist.get_rank()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    usage = {"rank": dist.get_rank(), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(usage) + "\n")
    os.replace(tmp, path)


def _report(out: Path) -> None:
    """The summary table and curves.png of the run so far (rank 0, at the end of a run)."""
    from megatron_revisual.train.report import read_metrics, summary_table, write_curves

    print("\n" + summary_table(read_metrics(out), out), file=console())
    print(f"revisual train: curves in {write_curves(out)}; logs in {out / 'logs'}", file=console())
