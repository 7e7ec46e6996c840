"""README's main command, `revisual demo`, end to end in a subprocess (vLLM included)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.slow
def test_demo_runs_every_step(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "megatron_revisual.cli", "demo",
        "--config", str(ROOT / "configs" / "tiny_cpu_demo.yaml"),
        f"output_dir={out}", f"model.hf_path={out / 'hf_tiny'}", "train.train_iters=4",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "demo OK" in proc.stdout

    summary = json.loads((out / "demo_summary.json").read_text())
    config = json.loads((out / "hf_tiny" / "config.json").read_text())
    vocab = config["text_config"]["vocab_size"]
    assert summary["hf"]["logits_shape"][0] == 1 and summary["hf"]["logits_shape"][2] == vocab
    # 84x56 image -> 6x4 patches of 14 -> 24 patches, merged 2x2 -> 6 placeholder tokens
    assert summary["hf"]["image_grid_thw"] == [[1, 4, 6]]
    assert summary["hf"]["image_tokens"] == 6

    rows = [json.loads(line) for line in (out / "smoke_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # a random model starts near the uniform loss ln(vocab) and learns
    assert abs(rows[0]["loss"] - math.log(vocab)) < 0.2
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1

    assert len(summary["vllm"]["token_ids"]) == 8
    assert all(0 <= t < vocab for t in summary["vllm"]["token_ids"])
