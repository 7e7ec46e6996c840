"""What a finished (or stopped) run tells its user: a summary table on the console and a picture.

Both are drawn from <output_dir>/metrics.jsonl alone, so `revisual plot RUN_DIR` redraws the
picture of any run, finished, stopped or still going:

    .venv/bin/revisual plot runs/tiny_cpu_demo        # writes runs/tiny_cpu_demo/curves.png

`curves.png` has one panel per stage: the SFT loss; for a GRPO stage the reward terms, the
validation accuracy (markers) and, on the right axis, the mean response length.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Panel", "curve_panels", "draw_curves", "read_metrics", "summary_table", "write_curves"]

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# How many steps at each end of a stage the summary averages ("first" and "last" values).
_ENDS = 10


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; is {run_dir} the output_dir of a `revisual train` run?")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
    return rows


def _steps_by_stage(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "event" not in r and "stage" in r:
            out.setdefault(r["stage"], []).append(r)
    return out


def _series(steps: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in steps:
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            xs.append(int(r["stage_step"]))
            ys.append(float(v))
    return xs, ys


def _is_grpo(steps: list[dict[str, Any]]) -> bool:
    return any(k.startswith("reward/") for r in steps for k in r)


# --- the picture -------------------------------------------------------------------------------
@dataclass
class Panel:
    """One stage's curves: `left` on the panel's own axis, `right` on a twin axis; each maps a
    label to (stage steps, values)."""

    stage: str
    title: str
    left_label: str
    left: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    right_label: str | None = None
    right: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def curve_panels(rows: list[dict[str, Any]]) -> list[Panel]:
    """The panels of `curves.png`, in stage order, with the numbers they are drawn from."""
    panels = []
    for stage, steps in _steps_by_stage(rows).items():
        if not _is_grpo(steps):
            panels.append(Panel(stage, f"{stage}: SFT", "loss", {"loss": _series(steps, "loss")}))
            continue
        terms = sorted({k for r in steps for k in r if k.startswith("reward/")})
        left = {k.removeprefix("reward/"): _series(steps, k) for k in terms}
        if any("val/accuracy" in r for r in steps):
            left["val/accuracy"] = _series(steps, "val/accuracy")
        panels.append(Panel(stage, f"{stage}: GRPO", "reward", left, "response length (tokens)",
                            {"length": _series(steps, "response/length_mean")}))
    return panels


def draw_curves(panels: list[Panel]):
    """A matplotlib Figure with one axis per panel (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * max(1, len(panels)), 3.8), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=False):
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.left_label)
        for label, (xs, ys) in panel.left.items():
            style = {"marker": "o", "linestyle": "--"} if label.startswith("val/") else {}
            ax.plot(xs, ys, label=label, **style)
        handles, labels = ax.get_legend_handles_labels()
        if panel.right:
            twin = ax.twinx()
            twin.set_ylabel(panel.right_label)
            for label, (xs, ys) in panel.right.items():
                twin.plot(xs, ys, label=label, color="grey", linewidth=0.8)
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        if handles:
            ax.legend(handles, labels, fontsize="small", loc="best")
    return fig


def write_curves(run_dir: str | Path) -> Path:
    """Draw <run_dir>/curves.png from its metrics (written to a temporary name, then renamed)."""
    run_dir = Path(run_dir)
    panels = curve_panels(read_metrics(run_dir))
    if not panels:
        raise ValueError(f"{run_dir / METRICS_FILE} has no training steps to plot")
    out = run_dir / CURVES_FILE
    tmp = out.with_name(f".{CURVES_FILE}.tmp")
    draw_curves(panels).savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out)
    return out


# --- the summary table -------------------------------------------------------------------------
def _ends(values: list[float]) -> tuple[float, float]:
    n = max(1, min(_ENDS, len(values) // 2))
    return sum(values[:n]) / n, sum(values[-n:]) / n


def _wall_seconds(rows: list[dict[str, Any]], stage: str, steps: list[dict[str, Any]]) -> float:
    """From the stage's first start to its last step when rows carry times, else summed steps."""
    starts = [r["time"] for r in rows if r.get("event") == "stage_start" and r.get("stage") == stage and "time" in r]
    if starts and "time" in steps[-1]:
        return float(steps[-1]["time"]) - float(starts[0])
    return sum(float(r.get("time/step", 0.0)) for r in steps)


def summary_table(rows: list[dict[str, Any]], run_dir: str | Path) -> str:
    """Per stage: steps, wall time, first -> last of its headline numbers (means over the first
    and last min(10, steps/2) steps; validation: first and last run), and where its outputs are."""
    from megatron_revisual.train.metrics_log import format_eta

    lines = []
    for stage, steps in _steps_by_stage(rows).items():
        shown = []
        keys: tuple[str, ...] = ("loss",)
        if _is_grpo(steps):
            # the overall reward only when other terms than accuracy make it up
            mixed = any(r.get("reward/overall") != r.get("reward/accuracy") for r in steps)
            keys = ("reward/accuracy",) + (("reward/overall",) if mixed else ()) + ("response/length_mean",)
        for key in keys:
            _, ys = _series(steps, key)
            if ys:
                a, b = _ends(ys)
                shown.append(f"{key.split('/')[-1].removesuffix('_mean')} {a:.3g} -> {b:.3g}")
        _, val = _series(steps, "val/accuracy")
        if val:
            shown.append(f"val/accuracy {val[0]:.3g} -> {val[-1]:.3g}")
        export = Path(run_dir) / "hf" / stage
        lines.append((stage, str(len(steps)), format_eta(_wall_seconds(rows, stage, steps)), ", ".join(shown),
                      str(export) if export.is_dir() else "-"))
    header = ("stage", "steps", "wall", f"first -> last (means of up to {_ENDS} steps)", "HF export")
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    table = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in lines]
    return "\n".join(line.rstrip() for line in table)
