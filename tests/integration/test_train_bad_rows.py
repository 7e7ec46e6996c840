"""`revisual train` on datasets with broken rows: it trains on the good rows and reports how
many rows it skipped, per reason, in metrics.jsonl (and on the console).

Cold-start SFT reads a jsonl with a line that is not JSON, a row without a response, an empty
prompt and an empty answer; the multimodal GRPO stage reads a jsonl whose images are missing,
unreadable or do not match the prompt's <image> markers. Both stages must still run their steps.

    .venv/bin/python -m pytest tests/integration/test_train_bad_rows.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_revisual.data.synthetic import arithmetic_rows, image_rows, write_rows

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _append(path: Path, lines: list[str]) -> None:
    with path.open("a") as f:
        f.writelines(line + "\n" for line in lines)


def _datasets(data: Path) -> dict[str, Path]:
    sft = write_rows(arithmetic_rows(40, seed=3), data / "sft.jsonl")
    _append(sft, [
        '{"problem": "What is 1 + 1?", "answer": "2", "response": "<think>',  # cut line: not JSON
        json.dumps({"problem": "What is 2 + 2?", "answer": "4"}),  # missing_response
        json.dumps({"problem": "  ", "answer": "4", "response": "4"}),  # empty_prompt
        json.dumps({"problem": "What is 3 + 3?", "answer": "", "response": "6"}),  # empty_answer
    ])
    mrl = write_rows(image_rows(16, seed=3, task="digit", digits=(1, 8)), data / "mrl.jsonl")
    (data / "mrl_images" / "garbage.png").write_bytes(b"not a png at all")
    _append(mrl, [
        json.dumps({"problem": "<image>What digit?", "answer": "1", "images": ["mrl_images/nope.png"]}),
        json.dumps({"problem": "<image>What digit?", "answer": "1", "images": ["mrl_images/garbage.png"]}),
        json.dumps({"problem": "<image><image>Two?", "answer": "1", "images": ["mrl_images/000000_0.png"]}),
        json.dumps({"problem": "<image>What digit?", "images": ["mrl_images/000001_0.png"]}),
    ])
    return {"sft": sft, "mrl": mrl}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_rows")
    paths = _datasets(out / "data")
    cmd = [
        sys.executable, "-m", "megatron_revisual.cli", "train", str(ROOT / "configs" / "tiny_cpu_demo.yaml"),
        f"output_dir={out}", "stages=[cold_start, mrl]", f"cold_start.data.path={paths['sft']}",
        f"mrl.data.path={paths['mrl']}", "mrl.validation.every=0", "cold_start.train_iters=3",
        "mrl.steps=2", "mrl.rollout.max_response_length=8", "checkpoint.every=0", "logging.wandb=false",
        "prepare.synthetic_data=null",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REVISUAL_ENGINE_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    (out / "stderr.txt").write_text(proc.stderr)
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_skipped_rows_are_counted_per_reason(run):
    starts = {r["stage"]: r for r in _rows(run) if r.get("event") == "stage_start"}
    sft, mrl = starts["cold_start"], starts["mrl"]
    assert sft["data/usable_rows"] == 40
    assert {k: v for k, v in sft.items() if k.startswith("data/skipped/")} == {
        "data/skipped/invalid_json": 1, "data/skipped/missing_response": 1,
        "data/skipped/empty_prompt": 1, "data/skipped/empty_answer": 1,
    }
    assert mrl["data/usable_rows"] == 16
    assert {k: v for k, v in mrl.items() if k.startswith("data/skipped/")} == {
        "data/skipped/missing_image": 1, "data/skipped/unreadable_image": 1,
        "data/skipped/image_count_mismatch": 1, "data/skipped/missing_answer": 1,
    }
    assert "skipped 4 of 44 rows" in (run / "stderr.txt").read_text()


def test_both_stages_trained_on_the_good_rows(run):
    steps = [r for r in _rows(run) if "event" not in r]
    assert [(r["stage"], r["stage_step"]) for r in steps] == [
        ("cold_start", 1), ("cold_start", 2), ("cold_start", 3), ("mrl", 1), ("mrl", 2)]
    for r in steps[:3]:
        assert r["sft/sequences"] == 16 and 0 < r["loss"] < 10 and r["skipped_non_finite"] == 0
    for r in steps[3:]:
        assert r["rollout/samples"] == 16 * 8 and r["rollout/skipped_requests"] == 0  # the 16 good rows, n=8
    assert json.loads((run / "DONE.json").read_text())["global_step"] == 5
