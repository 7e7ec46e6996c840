"""Where `revisual train` reports, on rank 0 only: a console progress line with ETA per step,
<output_dir>/metrics.jsonl (one JSON object per step, appended; a resumed run drops the rows
past its checkpoint first), and wandb (offline by default; the run id is kept in the
checkpoint so a resumed run continues the same wandb run).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from megatron_revisual.logfiles import console

__all__ = ["MetricsLog", "format_eta", "truncate_jsonl"]


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def truncate_jsonl(path: Path, global_step: int) -> int:
    """Keep only the rows with global_step <= `global_step` (a resumed run re-logs the rest);
    returns how many rows were dropped. Rewritten atomically."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            dropped += 1
            continue
        if int(row.get("global_step", 0)) <= global_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)
    return dropped


class MetricsLog:
    """Rank 0's reporter. `log(row)` writes a step's metrics everywhere; `progress(...)` prints
    the console line. `wandb_run_id` is what to store for a resume."""

    # the few numbers shown on the console line, when present
    CONSOLE_KEYS = (
        "loss", "reward/overall", "reward/accuracy", "pad/selected_count",
        "grad_norm", "lr", "time/step",
    )

    def __init__(self, output_dir: str | Path, *, run_name: str, config: dict[str, Any],
                 use_wandb: bool, wandb_mode: str, wandb_project: str, wandb_dir: str | None,
                 wandb_run_id: str | None, progress_bar: bool, resume_step: int) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, resume_step)
        self.progress_bar = progress_bar
        self._tty = console().isatty()
        self._stage_start: dict[str, tuple[float, int]] = {}
        self.wandb_run = None
        self.wandb_run_id = wandb_run_id
        if use_wandb and wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            directory = Path(wandb_dir or Path(output_dir) / "wandb")
            directory.mkdir(parents=True, exist_ok=True)
            self.wandb_run_id = wandb_run_id or secrets.token_hex(4)
            self.wandb_run = wandb.init(
                project=wandb_project, name=run_name, id=self.wandb_run_id, resume="allow",
                mode=wandb_mode, dir=str(directory), config=config,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
        if self.wandb_run is not None:
            numbers = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "global_step"}
            self.wandb_run.log(numbers, step=int(row["global_step"]))

    def progress(self, stage: str, step: int, total: int, row: dict[str, Any]) -> None:
        """One line: stage, step/total, a bar, ETA from this process's pace in the stage."""
        if not self.progress_bar:
            return
        now = time.monotonic()
        start_time, start_step = self._stage_start.setdefault(stage, (now, step - 1))
        done = step - start_step
        pace = (now - start_time) / done if done > 0 else float("nan")
        eta = format_eta(pace * (total - step))
        width = 20
        filled = int(width * step / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        shown = "  ".join(
            f"{k.split('/')[-1] if k.startswith(('reward/', 'pad/', 'time/')) else k}="
            f"{row[k]:.4g}" for k in self.CONSOLE_KEYS if isinstance(row.get(k), int | float)
        )
        line = f"[{stage}] {step}/{total} |{bar}| eta {eta}  {shown}"
        if self._tty:
            print("\r" + line, end="\n" if step == total else "", file=console(), flush=True)
        else:
            print(line, file=console(), flush=True)
        val = {k.removeprefix("val/"): v for k, v in row.items() if k.startswith("val/")}
        if val:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in sorted(val.items()) if isinstance(v, int | float))
            self.note(f"[{stage}] validation at step {step}: {shown}")

    def note(self, text: str) -> None:
        print(("\n" if self._tty else "") + text, file=console(), flush=True)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
