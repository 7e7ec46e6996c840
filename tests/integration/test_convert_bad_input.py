"""Bad input to `revisual convert`: each case fails with a message naming the file / tensor and
what was expected, and leaves nothing under --out (not even a hidden partial directory).

Checks that need no Megatron state (config, names, truncation, config mismatch) run in this
process; the ones found by the conversion ranks (shapes, checkpoint tensors) go through the CLI.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_revisual.convert.dist_ckpt import convert_hf_to_mcore, convert_mcore_to_hf
from megatron_revisual.convert.safetensors_io import ConvertError
from megatron_revisual.convert.verify import failures, verify
from megatron_revisual.testing.tiny_checkpoint import TinySpec, make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_revisual.convert.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF checkpoint and its (1, 1) Megatron conversion, written through the CLI."""
    root = tmp_path_factory.mktemp("bad")
    hf = make_tiny_checkpoint(root / "hf", seed=1)
    proc = _cli("hf-to-mcore", "--hf", str(hf), "--out", str(root / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote Megatron checkpoint" in proc.stdout
    return hf, root / "ckpt"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


@pytest.mark.integration
def test_rerun_asks_for_overwrite(tiny, tmp_path):
    hf, ckpt = tiny
    before = sorted(p.name for p in ckpt.iterdir())
    proc = _cli("hf-to-mcore", "--hf", str(hf), "--out", str(ckpt))
    assert proc.returncode == 2
    assert f"{ckpt} already exists and is not empty; pass --overwrite to replace it" in proc.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before


@pytest.mark.integration
def test_non_qwen_config(tiny, tmp_path):
    hf = _copy(tiny[0], tmp_path / "llama")
    config = json.loads((hf / "config.json").read_text())
    config["model_type"] = "llama"
    (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert_hf_to_mcore(hf, out)
    assert f"{hf / 'config.json'}" in str(e.value)
    assert "model_type is 'llama'; expected 'qwen2_5_vl' or 'qwen2'" in str(e.value)
    _assert_nothing_written(out)


@pytest.mark.integration
def test_missing_tensor(tiny, tmp_path):
    hf = _copy(tiny[0], tmp_path / "missing")
    weights = load_file(hf / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert_hf_to_mcore(hf, out)
    msg = str(e.value)
    assert (
        f"{hf / 'model.safetensors'}: 1 tensors the config ({hf / 'config.json'}) needs are missing"
        in msg
    )
    assert "'model.layers.1.mlp.up_proj.weight'" in msg
    _assert_nothing_written(out)


@pytest.mark.integration
def test_truncated_safetensors(tiny, tmp_path):
    hf = _copy(tiny[0], tmp_path / "truncated")
    path = hf / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 4096)
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert_hf_to_mcore(hf, out)
    expected = f"{path}: truncated: {size - 4096} bytes on disk, but the header describes {size}"
    assert expected in str(e.value)
    _assert_nothing_written(out)
    # verify names it too, before transformers reads the file
    proc = _cli("verify", "--hf", str(hf), "--ckpt", str(tiny[1]))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_shape_mismatch(tiny, tmp_path):
    hf = _copy(tiny[0], tmp_path / "shape")
    weights = load_file(hf / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(128, 96)
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    proc = _cli("hf-to-mcore", "--hf", str(hf), "--out", str(out), "--pp", "2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        f"{hf / 'model.safetensors'}: tensor 'model.layers.0.self_attn.o_proj.weight' has shape [128, 96]; "
        f"expected [128, 128] from {hf / 'config.json'}"
    ) in proc.stderr
    _assert_nothing_written(out)


@pytest.mark.integration
def test_hf_config_that_does_not_match_the_checkpoint(tiny, tmp_path):
    _, ckpt = tiny
    other = make_tiny_checkpoint(
        tmp_path / "other", spec=TinySpec(num_hidden_layers=3, intermediate_size=192)
    )
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert_mcore_to_hf(ckpt, out, hf_config_dir=other)
    msg = str(e.value)
    assert f"{other / 'config.json'} does not match the checkpoint {ckpt}" in msg
    assert "num_layers: 3 in config.json, 2 in the checkpoint" in msg
    assert "ffn_hidden_size: 192 in config.json, 256 in the checkpoint" in msg
    _assert_nothing_written(out)
    with pytest.raises(ConvertError, match="does not match the checkpoint"):
        verify(other, ckpt)


@pytest.mark.integration
def test_checkpoint_tensors_that_do_not_match_its_config(tiny, tmp_path):
    _, ckpt = tiny
    bad = _copy(ckpt, tmp_path / "ckpt_bad")
    meta = json.loads((bad / "revisual_model.json").read_text())
    meta["model"]["ffn_hidden_size"] = 192  # the stored tensors have 256
    (bad / "revisual_model.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    proc = _cli("mcore-to-hf", "--ckpt", str(bad), "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        f"{bad}: tensor 'language_model.decoder.layers.mlp.linear_fc2.weight' has global shape [2, 128, 256]; "
        f"the config of {bad / 'revisual_model.json'} expects [2, 128, 192]"
    ) in proc.stderr
    _assert_nothing_written(out)


@pytest.mark.integration
def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="not a Megatron distributed checkpoint"):
        convert_mcore_to_hf(tmp_path / "empty", tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.integration
def test_verify_fails_with_exit_1_when_a_tensor_is_missing(tiny, tmp_path):
    # (a matching pair exits 0: test_convert_roundtrip.py)
    hf, ckpt = tiny
    missing = _copy(hf, tmp_path / "missing")
    weights = load_file(missing / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    proc = _cli("verify", "--hf", str(missing), "--ckpt", str(ckpt), "--prompt", "What is 3 + 4?")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["weights_match"] is False
    assert "the exported weights differ from the HF files (model.layers.1.mlp.up_proj.weight)" in proc.stderr


def test_verify_report_failures():
    good = {"weights_match": True, "max_abs_logit_diff": 4e-4}
    assert failures(good, 1e-3) == []
    assert failures(dict(good, max_abs_logit_diff=2.5e-3), 1e-3) == [
        "max_abs_logit_diff 0.0025 exceeds --max-diff 0.001"
    ]
    assert failures(dict(good, max_abs_logit_diff=float("nan")), 1e-3) == [
        "max_abs_logit_diff nan exceeds --max-diff 0.001"
    ]
    assert failures(dict(good, weights_match=False, mismatched=["lm_head.weight"]), 1e-3) == [
        "the exported weights differ from the HF files (lm_head.weight)"
    ]


@pytest.mark.integration
def test_a_missing_distcp_file_is_named_by_mcore_to_hf_and_verify(tiny, tmp_path):
    hf, ckpt = tiny
    bad = _copy(ckpt, tmp_path / "ckpt_bad")
    (distcp,) = sorted(bad.glob("*.distcp"))
    distcp.unlink()
    expected = f"{bad}: incomplete torch_dist checkpoint: {distcp} is missing"
    out = tmp_path / "out"
    proc = _cli("mcore-to-hf", "--ckpt", str(bad), "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    _assert_nothing_written(out)
    proc = _cli("verify", "--hf", str(hf), "--ckpt", str(bad))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_hf_to_mcore_on_a_full_disk(tiny, tmp_path, monkeypatch, capsys):
    """A 256 KiB tmpfs where this process may mount one (root); elsewhere the full disk is
    simulated at the last write we own (the checkpoint's revisual_model.json)."""
    from megatron_revisual.convert import cli, dist_ckpt
    from megatron_revisual.testing.disk import small_tmpfs

    with small_tmpfs(tmp_path / "disk", size_bytes=256 * 2**10) as mounted:
        out = tmp_path / "disk" / "ckpt"
        if not mounted:
            def no_space(ckpt_dir, *args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device", str(ckpt_dir))

            monkeypatch.setattr(dist_ckpt, "write_checkpoint_metadata", no_space)
        rc = cli.main(["hf-to-mcore", "--hf", str(tiny[0]), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, err[-3000:]
        assert f"revisual convert hf-to-mcore: error: no space left on device while writing {out}\n" in err
        _assert_nothing_written(out)
