"""`revisual serve` on a Megatron checkpoint: exported to HF first (bitwise), then served."""

import argparse

import pytest
from safetensors.torch import load_file

from megatron_revisual.serving import add_serve_arguments, run_serve, servable_model_dir


@pytest.mark.integration
def test_serve_exports_a_megatron_checkpoint(tmp_path, capsys):
    from megatron_revisual.convert.dist_ckpt import convert_hf_to_mcore
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    hf = make_tiny_checkpoint(tmp_path / "hf", seed=5)
    ckpt = convert_hf_to_mcore(hf, tmp_path / "ckpt")

    exported = servable_model_dir(ckpt)
    assert exported == (tmp_path / "ckpt_hf").resolve()
    original, back = load_file(hf / "model.safetensors"), {}
    for shard in exported.glob("*.safetensors"):
        back.update(load_file(shard))
    assert sorted(back) == sorted(original)
    assert all(back[k].equal(original[k]) for k in original)

    # a complete export is reused, and the dry run serves the exported directory
    stamp = (exported / "config.json").stat().st_mtime_ns
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert run_serve(parser.parse_args([str(ckpt), "--dry-run", "--port", "8123"])) == 0
    out = capsys.readouterr().out
    assert str(exported) in out and "--port 8123" in out
    assert (exported / "config.json").stat().st_mtime_ns == stamp
    # an HF directory is served as it is
    assert servable_model_dir(hf) == hf.resolve()
