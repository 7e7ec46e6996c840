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

DynaMath (Zou et al., 2024, arXiv 2411.00836): each seed question comes in variants (10 in
DynaMath_Sample); the average-case accuracy is the accuracy over all variants, the worst-case
accuracy the share of seed questions answered correctly in every variant. The paper's Table 2
column is taken to be the worst case (ASSUMPTION: the paper does not say; its numbers, e.g.
Qwen-2.5-VL-7B 12.6, are far below that model's usual average-case DynaMath accuracy).

Repeated runs (AIME, --aime-runs n): per problem c of n samples correct; avg@n is the mean
accuracy over all samples (what Table 2's caption describes: the average over eight runs) and
pass@k the unbiased estimator 1 - C(n - c, k) / C(n, k) averaged over problems (Chen et al.,
2021), for k = 1, 2, 4, ... up to n (pass@1 equals avg@n).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "dynamath_metrics",
    "headline_accuracy",
    "markdown_report",
    "pass_at_k",
    "repeated_metrics",
    "summarize",
    "summarize_dataset",
    "wemath_metrics",
]

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


def _by_group(records: Iterable[Mapping[str, Any]]) -> dict[str, list[bool]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        if r.get("group") is not None:
            groups[str(r["group"])].append(bool(r["correct"]))
    return groups


def dynamath_metrics(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Worst-case (every variant right) and average-case accuracy over DynaMath's seed questions."""
    groups = _by_group(records)
    total = sum(len(v) for v in groups.values())
    return {
        "seed_questions": len(groups),
        "variants": total,
        "worst_case": _ratio(sum(all(v) for v in groups.values()), len(groups)),
        "average_case": _ratio(sum(sum(v) for v in groups.values()), total),
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c of n samples correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0)


def repeated_metrics(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """avg@n and pass@k over problems asked n times each (module docstring)."""
    groups = _by_group(records)
    if not groups:
        return {"problems": 0, "runs": 0, "avg": None, "pass@k": {}}
    n = min(len(v) for v in groups.values())
    ks = sorted({k for k in (2**i for i in range(n.bit_length())) if k <= n} | {n})
    return {
        "problems": len(groups),
        "runs": n,
        "avg": _ratio(sum(sum(v) for v in groups.values()), sum(len(v) for v in groups.values())),
        "pass@k": {str(k): sum(pass_at_k(len(v), sum(v), k) for v in groups.values()) / len(groups) for k in ks},
    }


def headline_accuracy(name: str, dataset_summary: Mapping[str, Any]) -> float | None:
    """The number of a benchmark's column in the paper's table: DynaMath's worst case, else the
    accuracy over all samples (for repeated runs: avg@n)."""
    if name == "dynamath" and "dynamath" in dataset_summary:
        return dataset_summary["dynamath"]["worst_case"]
    return dataset_summary["accuracy"]


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
    if name == "dynamath":
        out["dynamath"] = dynamath_metrics(records)
    if any(r.get("run") is not None for r in records):
        out["repeated"] = repeated_metrics(records)
    out["headline"] = headline_accuracy(name, out)
    return out


def summarize(records: Sequence[Mapping[str, Any]], datasets: Sequence[str]) -> dict[str, Any]:
    """Per-dataset summaries plus the overall numbers: ``average`` is the mean of the datasets'
    headline numbers (the paper's "Avg.": its column per benchmark), ``accuracy`` the pooled
    accuracy over all samples."""
    per = {
        name: summarize_dataset(name, [r for r in records if r["dataset"] == name])
        for name in datasets
    }
    accuracies = [d["headline"] for d in per.values() if d["headline"] is not None]
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
        if "dynamath" in d:
            m = d["dynamath"]
            lines += ["", f"## dynamath ({m['seed_questions']} seed questions, {m['variants']} variants)", "",
                      f"worst case {_pct(m['worst_case'])} %, average case {_pct(m['average_case'])} %"]
        if "repeated" in d:
            m = d["repeated"]
            ks = ", ".join(f"pass@{k} {_pct(v)} %" for k, v in m["pass@k"].items())
            lines += ["", f"## {name}: {m['problems']} problems x {m['runs']} runs", "",
                      f"avg@{m['runs']} {_pct(m['avg'])} %; {ks}"]
    return "\n".join(lines) + "\n"
