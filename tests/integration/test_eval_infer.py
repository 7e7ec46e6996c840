"""`revisual infer` on the tiny Qwen2.5-VL with a generated image: vLLM (in a child process,
as the command runs) and the transformers fallback (in-process)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from megatron_revisual.infer import add_infer_arguments, run_infer
from megatron_revisual.testing.images import fixture_image

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("infer")
    fixture_image(7, size=(140, 112)).save(root / "figure.png")
    return make_tiny_checkpoint(root / "tiny-vl", seed=0), root / "figure.png"


def _blocks(stdout: str) -> list[str]:
    return re.findall(r"^=== response (\d+)/(\d+)", stdout, flags=re.MULTILINE)


@pytest.mark.vllm
def test_infer_vllm_prints_each_sequence(tiny):
    model, image = tiny
    cmd = [  # the released infer.py's flags, plus what CPU vLLM needs
        sys.executable, "-m", "megatron_revisual.infer",
        "--model_path", str(model), "--image_path", str(image), "--question", "What is the area?",
        "--prompt", " Put the final answer in \\boxed{}.", "--do_sample", "True",
        "--max_tokens", "12", "--num_return_sequences", "3", "--top_k", "20",
        "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _blocks(proc.stdout) == [("1", "3"), ("2", "3"), ("3", "3")]
    assert proc.stdout.count("--- reasoning ---") == 3
    assert proc.stdout.count("--- answer ---") == 3
    # 12 tokens of a random model: cut by length, no boxed answer
    assert proc.stdout.count("(finish: length)") == 3


def test_infer_transformers_fallback(tiny, capsys):
    model, image = tiny
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    args = parser.parse_args(
        [
            "--model", str(model), "--image", str(image), "--question", "Find x.",
            "--engine", "transformers", "--dtype", "float32",
            "--max-tokens", "8", "--num-return-sequences", "2", "--temperature", "0",
        ]
    )  # fmt: skip
    assert run_infer(args) == 0
    out = capsys.readouterr().out
    assert _blocks(out) == [("1", "2"), ("2", "2")]
    # greedy: both sequences are the same text
    reasonings = re.findall(r"--- reasoning ---\n(.*?)\n--- answer ---", out, flags=re.DOTALL)
    assert len(reasonings) == 2 and reasonings[0] == reasonings[1]
