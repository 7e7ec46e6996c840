"""STAND-IN for `revisual train`, used only to test the launchers' stop / requeue / resume plumbing
fast. It trains nothing: it obeys the trainer's launch contract with a fake "model".

    python tests/integration/launchers/standin_trainer.py train configs/tiny_cpu_demo.yaml \
        output_dir=/tmp/standin train.train_iters=6 [--resume auto|none|PATH]
    (env STANDIN_STEP_SECONDS: seconds per fake step, default 0.5)

The contract it mirrors (the real trainer's, megatron_revisual/train):
- plain process: spawns cluster.nodes x cluster.devices_per_node gloo ranks itself; under torchrun
  (RANK/WORLD_SIZE/... set) each process is one rank and WORLD_SIZE must equal that product;
- `--resume auto` continues from the latest complete checkpoint in <output_dir>/checkpoints and
  exits 0 at once when <output_dir>/DONE.json exists;
- after every step it checks the stop file (<output_dir>/STOP or $REVISUAL_STOP_FILE); when present
  it checkpoints, deletes the file and exits 75; SIGUSR1 / SIGTERM create that file;
- on completion: DONE.json {global_step, weights_sha256, hf_export}, checkpoints/iter_XXXXXXX/,
  hf/<stage>/, metrics.jsonl.
The "weights" are a hash chain over the step numbers, so an interrupted and resumed run ends with
the same weights_sha256 as an uninterrupted one only if it resumed from the right step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXIT_STOPPED = 75


def _raw_config(path: str, overrides: list[str]) -> dict[str, Any]:
    from megatron_revisual.config import read_raw_config

    return read_raw_config(path, overrides)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_file(output_dir: Path) -> Path:
    return Path(os.environ.get("REVISUAL_STOP_FILE") or output_dir / "STOP")


def _install_stop_signals(stop_file: Path) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.touch()

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)


def _spawn_ranks(argv: list[str], world: int, stop_file: Path) -> int:
    """Plain-process mode: start `world` copies of this script as ranks, wait for all."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    _install_stop_signals(stop_file)
    codes = []
    for p in procs:
        while True:
            try:
                codes.append(p.wait())
                break
            except InterruptedError:
                continue
    return EXIT_STOPPED if all(c == EXIT_STOPPED for c in codes) else max(codes, key=abs)


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    marker = ckpt_dir / "latest_checkpointed_iteration.txt"
    if not marker.exists():
        return None
    return ckpt_dir / f"iter_{int(marker.read_text().strip()):07d}"


def _advance(weights: bytes, step: int) -> bytes:
    return hashlib.sha256(weights + step.to_bytes(8, "little")).digest()


def _run_rank(cfg: dict[str, Any], resume: str) -> int:
    import torch
    import torch.distributed as dist

    output_dir = Path(cfg.get("output_dir", "runs/standin"))
    cluster = cfg.get("cluster", {})
    expected = int(cluster.get("nodes", 1)) * int(cluster.get("devices_per_node", 1))
    world = int(os.environ["WORLD_SIZE"])
    if world != expected:
        print(f"standin: WORLD_SIZE={world} != cluster.nodes x cluster.devices_per_node = {expected}",
              file=sys.stderr)
        return 2
    stop_file = _stop_file(output_dir)
    _install_stop_signals(stop_file)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    iters = int(cfg.get("train", {}).get("train_iters", 6))
    # An environment variable, not an override: the launchers validate overrides against the schema.
    step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.5"))
    ckpt_dir = output_dir / "checkpoints"

    weights, step = b"\0" * 32, 0
    source = None if resume == "none" else (_latest_checkpoint(ckpt_dir) if resume == "auto" else Path(resume))
    if source is not None:
        state = json.loads((source / "state.json").read_text())
        weights, step = bytes.fromhex(state["weights"]), state["step"]
    if rank == 0:
        print(f"standin: rank 0 of {world}, starting at step {step} of {iters}", flush=True)
        with open(output_dir / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"start_step": step, "pid": os.getpid(),
                                "job": os.environ.get("SLURM_JOB_ID"),
                                "restart": os.environ.get("SLURM_RESTART_COUNT")}) + "\n")

    def save() -> None:
        if rank == 0:
            d = ckpt_dir / f"iter_{step:07d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "state.json").write_text(json.dumps({"step": step, "weights": weights.hex()}))
            (ckpt_dir / "latest_checkpointed_iteration.txt").write_text(str(step))
        dist.barrier()

    while step < iters:
        time.sleep(step_seconds)
        step += 1
        weights = _advance(weights, step)
        if rank == 0:
            with open(output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
        flag = torch.tensor([1 if stop_file.exists() else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and step < iters:
            save()
            if rank == 0:
                stop_file.unlink(missing_ok=True)
                print(f"standin: stopped at step {step}, checkpoint written", flush=True)
            dist.barrier()
            dist.destroy_process_group()
            return EXIT_STOPPED
    save()
    if rank == 0:
        hf = output_dir / "hf" / "final"
        hf.mkdir(parents=True, exist_ok=True)
        (hf / "weights.bin").write_bytes(weights)
        done = {"global_step": step, "weights_sha256": hashlib.sha256(weights).hexdigest(),
                "hf_export": str(hf)}
        (output_dir / "DONE.json").write_text(json.dumps(done))
        stop_file.unlink(missing_ok=True)
        print(f"standin: done at step {step}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="standin_trainer")
    parser.add_argument("command", choices=["train"])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--resume", default="auto")
    args = parser.parse_args(argv)
    cfg = _raw_config(args.config, args.overrides)
    output_dir = Path(cfg.get("output_dir", "runs/standin"))
    if args.resume == "auto" and (output_dir / "DONE.json").exists():
        print(f"standin: {output_dir}/DONE.json exists; nothing to do", flush=True)
        return 0
    output_dir.mkdir(parents=True, exist_ok=True)
    if "RANK" not in os.environ:
        cluster = cfg.get("cluster", {})
        world = int(cluster.get("nodes", 1)) * int(cluster.get("devices_per_node", 1))
        return _spawn_ranks(argv, world, _stop_file(output_dir))
    return _run_rank(cfg, args.resume)


if __name__ == "__main__":
    sys.exit(main())
