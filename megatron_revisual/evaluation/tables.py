"""Results in the layout of the paper's main table (Table 2 of arXiv 2506.04207: one row per
model, one column per benchmark, the average), runs side by side, and the paper's own rows.

    revisual eval ... --datasets paper                          # the run's row in that layout
    revisual eval --compare runs/a/m_summary.json runs/b/ paper  # runs and the paper's rows

The paper's numbers are data: `paper_table2.json` beside this module (source, metric notes and
every row of Table 2, as printed). A run's cell is its headline number for the benchmark
(`metrics.headline_accuracy`: DynaMath's worst case, AIME's avg@n, else accuracy) in percent.
With the paper in the comparison, each run gets a row of its differences to the paper's
ReVisual-R1 per benchmark, and over the average of the columns the run has (the paper's own
average covers all ten).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from megatron_revisual.evaluation.datasets import BENCHMARKS, PAPER_BENCHMARKS, benchmark_spec

__all__ = ["PAPER_MODEL", "TableRow", "compare_table", "load_paper_rows", "paper_layout", "run_row"]

PAPER_MODEL = "ReVisual-R1"


@dataclass(frozen=True)
class TableRow:
    model: str
    scores: dict[str, float]  # benchmark -> percent
    average: float | None = None  # None: the mean of `scores`
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float | None:
        if self.average is not None:
            return self.average
        return sum(self.scores.values()) / len(self.scores) if self.scores else None


def load_paper_rows() -> list[TableRow]:
    """Every row of the paper's Table 2 (as printed), with its group as the note."""
    data = json.loads(resources.files(__package__).joinpath("paper_table2.json").read_text(encoding="utf-8"))
    return [TableRow(r["model"], dict(r["scores"]), r["average"], note=f"paper, {r['group']}") for r in data["rows"]]


def run_row(summary: dict[str, Any], label: str | None = None) -> TableRow:
    """A run's row from its `<model>_summary.json` content."""
    scores = {
        name: 100 * d["headline"]
        for name, d in summary["datasets"].items()
        if d.get("headline") is not None
    }
    return TableRow(label or summary["model"], scores, note="this run")


def _columns(rows: Iterable[TableRow]) -> list[str]:
    present = {name for row in rows for name in row.scores}
    order = [*PAPER_BENCHMARKS, *(b for b in BENCHMARKS if b not in PAPER_BENCHMARKS)]
    return [b for b in order if b in present]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def paper_layout(rows: Sequence[TableRow], columns: Sequence[str] | None = None) -> str:
    """A markdown table: one row per model, one column per benchmark (the paper's order), Avg."""
    columns = list(columns or _columns(rows))
    lines = [
        "| Model | " + " | ".join(benchmark_spec(c).title for c in columns) + " | Avg. |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]
    for row in rows:
        cells = [_cell(row.scores.get(c)) for c in columns]
        lines.append(f"| {row.model} | " + " | ".join(cells) + f" | {_cell(row.mean)} |")
    return "\n".join(lines) + "\n"


def _gap_row(run: TableRow, paper: TableRow) -> TableRow:
    common = [c for c in run.scores if c in paper.scores]
    gaps = {c: run.scores[c] - paper.scores[c] for c in common}
    mean_gap = sum(gaps.values()) / len(gaps) if gaps else None
    return TableRow(f"Δ {run.model} − {paper.model} (paper)", gaps, mean_gap)


def _read_run(arg: str) -> TableRow:
    path = Path(arg)
    if path.is_dir():
        found = sorted(path.glob("*_summary.json"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"--compare {arg}: expected one *_summary.json in the directory, found {len(found)}"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"--compare {arg}: no such file (a revisual eval <model>_summary.json, a folder "
                                "holding one, or 'paper')")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        return run_row(summary, f"{summary['model']} ({path.parent.name})")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--compare {arg}: not a revisual eval summary ({type(e).__name__}: {e})") from None


def compare_table(args: Sequence[str], current: TableRow | None = None) -> str:
    """The rows of `args` (summary files, folders holding one, or "paper") after `current`,
    in the paper's layout; with "paper", a gap row per run against the paper's ReVisual-R1."""
    runs = [current] if current is not None else []
    with_paper = False
    for arg in args:
        if arg == "paper":
            with_paper = True
        else:
            runs.append(_read_run(arg))
    rows = list(runs)
    if with_paper:
        paper_rows = load_paper_rows()
        ours = next(r for r in paper_rows if r.model == PAPER_MODEL)
        rows = [*paper_rows, *runs, *(_gap_row(r, ours) for r in runs)]
    columns = _columns(rows if runs else load_paper_rows())
    return paper_layout(rows, columns)
