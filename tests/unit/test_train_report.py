"""The run report: the summary table and curves.png are drawn from metrics.jsonl, and what the
picture shows is exactly those numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from megatron_revisual.train.report import (
    curve_panels,
    draw_curves,
    read_metrics,
    summary_table,
    write_curves,
)


def _rows() -> list[dict]:
    rows = [{"global_step": 0, "stage": "cold_start", "event": "stage_start", "time": 100.0}]
    for s in range(1, 5):
        rows.append({"global_step": s, "stage": "cold_start", "stage_step": s, "loss": 4.0 - s,
                     "time/step": 1.0, "time": 100.0 + 2 * s})
    rows.append({"global_step": 4, "stage": "mrl", "event": "stage_start", "time": 200.0})
    for s in range(1, 7):
        row = {"global_step": 4 + s, "stage": "mrl", "stage_step": s, "reward/accuracy": s / 10,
               "reward/format": 1.0, "reward/overall": s / 10 + 0.1, "response/length_mean": 20.0 + s,
               "time/step": 3.0, "time": 200.0 + 5 * s}
        if s in (3, 6):
            row["val/accuracy"] = s / 6
        rows.append(row)
    return rows


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_panels_hold_the_metrics_they_are_drawn_from():
    panels = curve_panels(_rows())
    assert [(p.stage, p.title) for p in panels] == [("cold_start", "cold_start: SFT"), ("mrl", "mrl: GRPO")]
    assert panels[0].left == {"loss": ([1, 2, 3, 4], [3.0, 2.0, 1.0, 0.0])}
    mrl = panels[1]
    assert sorted(mrl.left) == ["accuracy", "format", "overall", "val/accuracy"]
    assert mrl.left["accuracy"] == ([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert mrl.left["val/accuracy"] == ([3, 6], [0.5, 1.0])
    assert mrl.right == {"length": ([1, 2, 3, 4, 5, 6], [21.0, 22.0, 23.0, 24.0, 25.0, 26.0])}


def test_figure_draws_every_series_of_every_panel():
    panels = curve_panels(_rows())
    fig = draw_curves(panels)
    main_axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in main_axes] == ["cold_start: SFT", "mrl: GRPO"]
    for ax, panel in zip(main_axes, panels, strict=True):
        drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
        assert drawn == panel.left
    twins = [ax for ax in fig.axes if not ax.get_title()]
    assert len(twins) == 1
    assert ({ln.get_label(): list(ln.get_ydata()) for ln in twins[0].get_lines()}
            == {"length": panels[1].right["length"][1]})


def test_write_curves_writes_a_png_atomically(tmp_path):
    path = write_curves(_write(tmp_path, _rows()))
    assert path == tmp_path / "curves.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1000, 380)  # 2 panels x 5 in x 100 dpi, 3.8 in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_summary_table_numbers(tmp_path):
    (tmp_path / "hf" / "mrl").mkdir(parents=True)
    table = summary_table(_rows(), tmp_path).splitlines()
    assert table[0].split()[:4] == ["stage", "steps", "wall", "first"]
    cold, mrl = table[2], table[3]
    # 4 steps: means of the first and last 2; wall time from the stage start to its last row
    assert cold.split()[:3] == ["cold_start", "4", "0m08s"] and "loss 2.5 -> 0.5" in cold and cold.endswith("-")
    assert mrl.split()[:3] == ["mrl", "6", "0m30s"]
    assert "accuracy 0.2 -> 0.5" in mrl and "overall 0.3 -> 0.6" in mrl and "length 22 -> 25" in mrl
    assert "val/accuracy 0.5 -> 1" in mrl and mrl.rstrip().endswith(str(tmp_path / "hf" / "mrl"))


def test_bad_metrics_name_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"stage": "mrl"}\n{not json\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics"):
        read_metrics(tmp_path / "missing")
    with pytest.raises(ValueError, match="no training steps"):
        write_curves(_write(tmp_path, [{"global_step": 0, "stage": "mrl", "event": "stage_start"}]))
