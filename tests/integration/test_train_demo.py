"""The tiny CPU demo, run exactly as README's main job (`.venv/bin/revisual train
configs/tiny_cpu_demo.yaml`, the user's environment, the recipe's own output_dir under a fresh
working directory): all three stages on 2 gloo ranks with the real vLLM engine.

Acceptance: the cold-start SFT loss falls; in the MRL stage the mean accuracy reward of the last
10 steps exceeds that of the first 10 by at least 0.3 and the final validation accuracy is at
least 0.9; the console stays under 400 lines (the engine's and Megatron's logs go to
output_dir/logs/); curves.png shows the run; the final HF export loads in transformers.
The seed sweep repeats the MRL criteria for train.seed in 1..5.

    .venv/bin/python -m pytest tests/integration/test_train_demo.py -s
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 15 * 60
MAX_CONSOLE_LINES = 400


def run_readme_demo(cwd: Path, env: dict[str, str], *overrides: str) -> dict:
    """README's main command, run from `cwd` (so the recipe's relative output_dir lands there)
    with the user's environment `env`."""
    revisual = Path(sys.executable).parent / "revisual"
    cmd = [str(revisual), "train", str(ROOT / "configs" / "tiny_cpu_demo.yaml"), *overrides]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=BUDGET_S, env=env)
    seconds = time.monotonic() - t0
    out = cwd / "runs" / "tiny_cpu_demo"
    assert proc.returncode == 0, (proc.stderr[-6000:], _tail(out / "logs" / "rank0.log"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "event" not in r]
    print(f"demo {' '.join(overrides)}: {seconds:.0f} s")
    return {"out": out, "seconds": seconds, "steps": steps, "console": proc.stdout + proc.stderr}


def _tail(path: Path) -> str:
    return path.read_text()[-4000:] if path.exists() else f"({path} missing)"


def mrl_learning(steps: list[dict]) -> tuple[float, float, float]:
    """(mean accuracy reward of the first 10 MRL steps, of the last 10, final validation accuracy)."""
    mrl = [r for r in steps if r["stage"] == "mrl"]
    acc = [r["reward/accuracy"] for r in mrl]
    assert len(acc) >= 20
    val = [r["val/accuracy"] for r in mrl if "val/accuracy" in r]
    return sum(acc[:10]) / 10, sum(acc[-10:]) / 10, val[-1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, user_env) -> dict:
    return run_readme_demo(tmp_path_factory.mktemp("demo"), user_env)


def _stage(demo, name):
    return [r for r in demo["steps"] if r["stage"] == name]


def test_sft_loss_falls(demo):
    losses = [r["loss"] for r in _stage(demo, "cold_start")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"SFT loss {first:.3f} -> {last:.3f}")
    assert last < 0.25 * first


def test_mrl_learns_to_read_the_image(demo):
    first, last, val = mrl_learning(demo["steps"])
    print(f"MRL accuracy reward: first 10 steps {first:.3f}, last 10 steps {last:.3f}; final validation {val:.3f}")
    assert last - first >= 0.3
    assert val >= 0.9


def test_console_is_short_and_logs_go_to_files(demo):
    lines = demo["console"].splitlines()
    print(f"console: {len(lines)} lines")
    assert len(lines) <= MAX_CONSOLE_LINES
    n_steps = {s: len(_stage(demo, s)) for s in ("cold_start", "mrl", "trl")}
    for stage, n in n_steps.items():
        assert sum(line.startswith(f"[{stage}] ") and f"/{n} |" in line for line in lines) == n, stage
        assert any(line.startswith(f"=== stage {stage} ") for line in lines), stage
    validations = [r["stage_step"] for r in _stage(demo, "mrl") if "val/accuracy" in r]
    assert len(validations) == 10  # every 10 of 100 steps
    assert [int(line.split()[4].rstrip(":")) for line in lines
            if line.startswith("[mrl] validation at step")] == validations
    assert not [line for line in lines if "rollout-engine pid" in line or "UserWarning" in line]
    logs = demo["out"] / "logs"
    # one colocated engine per rank, each with its own log; TRL takes MRL's engines (one engine
    # start per rank for the run)
    assert sorted(p.name for p in logs.iterdir()) == ["engine0.log", "engine1.log", "rank0.log", "rank1.log"]
    assert sum(line.startswith("[trl] rollout engines kept from the previous stage") for line in lines) == 1
    for name in ("engine0.log", "engine1.log"):
        assert "vLLM" in (logs / name).read_text() or "vllm" in (logs / name).read_text()
    summary = lines[lines.index(next(line for line in lines if line.startswith("stage "))):]
    assert [row.split()[0] for row in summary[2:5]] == ["cold_start", "mrl", "trl"]


def test_curves_png_shows_every_stage(demo):
    from PIL import Image

    from megatron_revisual.train.report import curve_panels, read_metrics

    path = demo["out"] / "curves.png"
    panels = curve_panels(read_metrics(demo["out"]))
    assert [p.stage for p in panels] == ["cold_start", "mrl", "trl"]
    assert panels[1].left["accuracy"][1] == [r["reward/accuracy"] for r in _stage(demo, "mrl")]
    with Image.open(path) as im:
        assert im.size == (1500, 380)  # one panel per stage


def test_all_three_stages_ran_and_left_exports(demo):
    out = demo["out"]
    assert [s for s in ("cold_start", "mrl", "trl") if _stage(demo, s)] == ["cold_start", "mrl", "trl"]
    done = json.loads((out / "DONE.json").read_text())
    assert done["global_step"] == len(demo["steps"]) and done["hf_export"] == str(out / "hf" / "trl")
    assert sorted(p.name for p in (out / "hf").iterdir()) == ["cold_start", "mrl", "trl"]
    # the weights really changed in the RL stages, and the rollout engine held the trainer's weights
    for name in ("mrl", "trl"):
        assert max(r["rollout/logprob_diff_max"] for r in _stage(demo, name) if "rollout/logprob_diff_max" in r) < 1e-3
    assert (out / "wandb").is_dir()  # offline wandb run


def test_final_export_loads_in_transformers_and_reads_the_digit(demo):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from megatron_revisual.data.synthetic import image_rows
    from megatron_revisual.rl.rewards import extract_answer

    hf = demo["out"] / "hf" / "trl"
    processor = AutoProcessor.from_pretrained(hf)
    model = AutoModelForImageTextToText.from_pretrained(hf, dtype=torch.float32).eval()
    answers = []
    for row in image_rows(4, seed=99, task="digit", digits=(1, 8)):
        question = row["problem"].removeprefix("<image>")
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=row["images"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append((row["answer"], extract_answer(text), text))
    print(f"final model answers: {answers}")
    assert sum(truth == got for truth, got, _ in answers) >= 3, answers


@pytest.mark.seed_sweep
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_seed_sweep_every_seed_learns(tmp_path, user_env, seed):
    """README's main command with train.seed=S: learning must not hinge on one seed."""
    run = run_readme_demo(tmp_path, user_env, f"train.seed={seed}")
    first, last, val = mrl_learning(run["steps"])
    print(f"seed {seed}: MRL accuracy reward {first:.3f} -> {last:.3f}; final validation {val:.3f}")
    assert last - first >= 0.3
    assert val >= 0.9
