"""Accuracy, per-category breakdowns, WeMath's four-dimensional metrics, and the tables.

Everything here is computed from per-sample records (the dicts written to the per-sample
jsonl), so a summary can always be recomputed from that file.

WeMath (Qiao et al., 2024, "We-Math: Does Your Large Multimodal Model Achieve Human-like
Mathematical Reasoning?"; definition as in its ``evaluation/four_dimensional_metrics.py``):
each multi-step problem (key ``2steps_multi`` / ``3steps_multi``) comes with its one-step
sub-problems (``2steps_1``, ``2steps_2``[, ``3steps_3``]) under the same ``ID``. Per problem:

    IK  Insufficient Knowledge      some sub-problem wrong, multi-step wrong
    IG  Inadequate Generalization   all sub-problems right, multi-step wrong
    CM  Complete Mastery            strict: all sub-problems right, multi-step right
                                    loose:  some sub-problem right, multi-step right
    RM  Rote Memorization           strict: some sub-problem wrong, multi-step right
                                    loose:  all sub-problems wrong, multi-step right

IK, IG and CM are reported as a fraction of the N problems, RM as RM / (CM + RM), and the
score as (N - 0.5 IG - RM - IK) / N, strict and loose. The released script divides by a fixed
525 (the number of problems in testmini); here N is the number of complete problems found, which
is 525 on the full testmini. Problems missing a sub-problem or the multi-step row (e.g. a run
with --max-samples) are left out and counted in ``incomplete_problems``. S1 / S2 / S3 are the
accuracies on the one-step sub-problems, the two-step and the three-step problems (of the
complete problems), as in WeMath's ``accuracy.py``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["markdown_report", "summarize", "summarize_dataset", "wemath_metrics"]

_WEMATH_KEY = re.compile(r"([23])steps_(\d+|multi)")


def _ratio(num: int | float, den: int | float) -> float | None:
    return num / den if den else None


def _counts(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    correct = sum(1 for r in records if r["correct"])
    return {"accuracy": _ratio(correct, len(records)), "correct": correct, "total": len(records)}


def wemath_metrics(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """WeMath's IK / IG / CM / RM and scores (module docstring) from records with ``group``,
    ``step`` and ``correct``."""
    problems: dict[str, dict[str, bool]] = defaultdict(dict)
    steps_of: dict[str, int] = {}
    for r in records:
        match = _WEMATH_KEY.fullmatch(str(r.get("step") or ""))
        if not match or r.get("group") is None:
            continue
        group = str(r["group"])
        steps_of[group] = int(match.group(1))
        problems[group][match.group(2)] = bool(r["correct"])

    n = ik = ig = cm_strict = cm_loose = rm_strict = rm_loose = 0
    one_step: list[bool] = []
    multi_by_steps: dict[int, list[bool]] = {2: [], 3: []}
    incomplete = 0
    for group, rows in problems.items():
        steps = steps_of[group]
        wanted = {str(i) for i in range(1, steps + 1)} | {"multi"}
        if set(rows) != wanted:
            incomplete += 1
            continue
        subs = [rows[str(i)] for i in range(1, steps + 1)]
        multi = rows["multi"]
        n += 1
        one_step += subs
        multi_by_steps[steps].append(multi)
        if multi:
            cm_strict += all(subs)
            rm_strict += not all(subs)
            cm_loose += any(subs)
            rm_loose += not any(subs)
        else:
            ig += all(subs)
            ik += not all(subs)

    def score(rm: int) -> float | None:
        return _ratio(n - 0.5 * ig - rm - ik, n)

    return {
        "problems": n,
        "incomplete_problems": incomplete,
        "counts": {
            "IK": ik,
            "IG": ig,
            "CM_strict": cm_strict,
            "CM_loose": cm_loose,
            "RM_strict": rm_strict,
            "RM_loose": rm_loose,
        },
        "strict": {
            "score": score(rm_strict),
            "IK": _ratio(ik, n),
            "IG": _ratio(ig, n),
            "CM": _ratio(cm_strict, n),
            "RM": _ratio(rm_strict, cm_strict + rm_strict),
        },
        "loose": {
            "score": score(rm_loose),
            "IK": _ratio(ik, n),
            "IG": _ratio(ig, n),
            "CM": _ratio(cm_loose, n),
            "RM": _ratio(rm_loose, cm_loose + rm_loose),
        },
        "S1": _ratio(sum(one_step), len(one_step)),
        "S2": _ratio(sum(multi_by_steps[2]), len(multi_by_steps[2])),
        "S3": _ratio(sum(multi_by_steps[3]), len(multi_by_steps[3])),
    }


def summarize_dataset(name: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy of one benchmark, its per-category breakdown and (WeMath) its own metrics."""
    out = _counts(records)
    out["unparsed"] = sum(1 for r in records if not r["parsed"] and not r.get("error"))
    out["errors"] = sum(1 for r in records if r.get("error"))
    by_subset: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        for subset in r.get("subsets") or ():
            by_subset[subset].append(r)
    out["sub_metrics"] = {k: _counts(v) for k, v in sorted(by_subset.items())}
    if name == "wemath":
        out["wemath"] = wemath_metrics(records)
    return out


def summarize(records: Sequence[Mapping[str, Any]], datasets: Sequence[str]) -> dict[str, Any]:
    """Per-dataset summaries plus the overall numbers: ``average`` is the mean of the dataset
    accuracies (the paper's "Avg."), ``accuracy`` the pooled one over all samples."""
    per = {
        name: summarize_dataset(name, [r for r in records if r["dataset"] == name])
        for name in datasets
    }
    accuracies = [d["accuracy"] for d in per.values() if d["accuracy"] is not None]
    overall = _counts(records)
    overall["average"] = _ratio(sum(accuracies), len(accuracies))
    return {"datasets": per, "overall": overall}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def markdown_report(model: str, summary: Mapping[str, Any]) -> str:
    """The summary as markdown tables (accuracies in percent)."""
    lines = [
        f"# Evaluation of `{model}`",
        "",
        "| Dataset | Accuracy (%) | Correct | Total | Unparsed | Errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, d in summary["datasets"].items():
        lines.append(
            f"| {name} | {_pct(d['accuracy'])} | {d['correct']} | {d['total']} "
            f"| {d['unparsed']} | {d['errors']} |"
        )
    o = summary["overall"]
    lines.append(f"| **average** | {_pct(o['average'])} | | | | |")
    lines.append(f"| all samples | {_pct(o['accuracy'])} | {o['correct']} | {o['total']} | | |")
    for name, d in summary["datasets"].items():
        if d["sub_metrics"]:
            lines += [
                "",
                f"## {name} by category",
                "",
                "| Category | Accuracy (%) | Correct | Total |",
            ]
            lines.append("|---|---:|---:|---:|")
            for sub, m in d["sub_metrics"].items():
                lines.append(f"| {sub} | {_pct(m['accuracy'])} | {m['correct']} | {m['total']} |")
        if "wemath" in d:
            w = d["wemath"]
            lines += [
                "",
                f"## wemath four-dimensional metrics ({w['problems']} problems, "
                f"{w['incomplete_problems']} incomplete left out)",
                "",
                "| | Score (%) | IK (%) | IG (%) | CM (%) | RM (%) |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for mode in ("strict", "loose"):
                m = w[mode]
                lines.append(
                    f"| {mode} | {_pct(m['score'])} | {_pct(m['IK'])} | {_pct(m['IG'])} "
                    f"| {_pct(m['CM'])} | {_pct(m['RM'])} |"
                )
            lines.append("")
            lines.append(f"S1 {_pct(w['S1'])} %, S2 {_pct(w['S2'])} %, S3 {_pct(w['S3'])} %")
    return "\n".join(lines) + "\n"
