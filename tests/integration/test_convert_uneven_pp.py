"""`revisual convert` at a pipeline size that does not divide the layers, as training allows
with parallel.num_layers_in_first_pipeline_stage: a 3-layer tiny Qwen2.5-VL written from --pp 2
(the default split, 1 + 2 layers) and with --first-stage-layers 2 (2 + 1) both verify against
transformers' logits at --pp 2 and at PP 1; a split the command cannot make is refused with an
error that names the command's own options only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_revisual.convert.dist_ckpt import default_first_stage_layers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_revisual.convert.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def hf3(tmp_path_factory) -> Path:
    from megatron_revisual.testing.tiny_checkpoint import DEFAULT_SPEC, make_tiny_checkpoint

    spec = dataclasses.replace(DEFAULT_SPEC, num_hidden_layers=3)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("uneven") / "hf", seed=5, spec=spec)


def test_default_split_makes_the_largest_stage_smallest():
    assert default_first_stage_layers(3, 2) == 1  # 1 + 2
    assert default_first_stage_layers(28, 3) == 8  # 8 + 10 + 10 (the 7B's 28 layers)
    assert default_first_stage_layers(64, 3) == 20  # 20 + 22 + 22 (the 32B's 64 layers)
    assert default_first_stage_layers(4, 3) == 2  # 2 + 1 + 1
    assert default_first_stage_layers(2, 3) is None  # more stages than layers
    assert default_first_stage_layers(28, 1) is None  # one stage: nothing to split


@pytest.mark.parametrize("first", [None, "2"])
def test_uneven_pipeline_split_converts_and_verifies(hf3, tmp_path, first):
    extra = [] if first is None else ["--first-stage-layers", first]
    out = tmp_path / "ckpt"
    proc = _cli("hf-to-mcore", "--hf", str(hf3), "--out", str(out), "--pp", "2", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for pp in ("2", "1"):
        proc = _cli("verify", "--hf", str(hf3), "--ckpt", str(out), "--pp", pp, "--prompt", "What is 3 + 4?",
                    *(extra if pp == "2" else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
        assert report["weights_match"] is True and report["top1_agreement"] == 1.0
        assert report["max_abs_logit_diff"] < 1e-4


def test_a_split_the_command_cannot_make_names_its_own_options(hf3, tmp_path):
    proc = _cli("hf-to-mcore", "--hf", str(hf3), "--out", str(tmp_path / "x"), "--pp", "2",
                "--first-stage-layers", "3")
    assert proc.returncode == 2
    assert ("--first-stage-layers=3: the remaining 0 of model.num_layers=3 must split evenly over 1 later stages"
            in proc.stderr)
    assert "parallel." not in proc.stderr
    assert not (tmp_path / "x").exists()
