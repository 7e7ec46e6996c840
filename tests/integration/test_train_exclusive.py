"""A running `revisual train` owns its output_dir, and nothing it started outlives it.

One cold-start run (2 gloo ranks) is started and left running past its first checkpoint (so
Megatron-Core's dist_checkpointing has started its async writer's Manager process in each
rank). Then:
- a second `revisual train` on the same output_dir exits 2 at once, naming the first one's pid
  and host, and writes nothing (no metrics row, no checkpoint, the first one's files intact);
- SIGKILL to the first trainer's process group leaves no process of its tree alive (checked in
  the process table: every descendant seen before the kill, by pid and start time).

    .venv/bin/python -m pytest tests/integration/test_train_exclusive.py -s
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_revisual.testing.processes import command_line, descendants, wait_gone

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def _command(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "megatron_revisual.cli", "train", str(ROOT / "configs" / "tiny_cpu_demo.yaml"),
        f"output_dir={out}", "stages=[cold_start]", "cold_start.train_iters=200", "checkpoint.every=1",
        "checkpoint.keep_last=100", "logging.wandb=false", "logging.progress_bar=false",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_second_trainer_is_refused_and_a_killed_one_leaves_no_process(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_command(out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    tree: set = set()
    try:
        marker = out / "checkpoints" / "iter_0000001" / "trainer_state.json"
        deadline = time.monotonic() + 600
        while not marker.exists():
            if first.poll() is not None:
                raise AssertionError(f"the first run ended early:\n{first.stderr.read()[-4000:]}")
            assert time.monotonic() < deadline, "no first checkpoint within 600 s"
            time.sleep(0.1)

        checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
        t0 = time.monotonic()
        second = subprocess.run(_command(out), cwd=ROOT, env=_env(), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr[-4000:]
        assert time.monotonic() - t0 < 120
        assert f"in use by another trainer (pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        # the refused run touched nothing: the first one's checkpoints are there, none removed
        now = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert set(checkpoints) <= set(now)

        tree = descendants(first.pid)
        # 2 ranks, each with Megatron's Manager process (and a reaper)
        managers = [p for p, _ in tree if "multiprocessing.spawn" in command_line(p)]
        assert len(managers) >= 4, [command_line(p) for p, _ in tree]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    survivors = wait_gone(tree, timeout_s=20)
    for pid, _ in survivors:  # do not leak them into the rest of the test session
        os.kill(pid, signal.SIGKILL)
    assert not survivors, [command_line(p) for p, _ in survivors]
