"""`revisual serve` command building and model-directory checks; `revisual infer` output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from megatron_revisual.data.chat_template import CHAT_TEMPLATE
from megatron_revisual.infer import (
    InferResponse,
    add_infer_arguments,
    format_responses,
    run_infer,
    split_response,
)
from megatron_revisual.serving import (
    ModelDirError,
    add_serve_arguments,
    build_server_command,
    check_model_dir,
    run_serve,
)


def _hf_dir(path: Path, *, template: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    if template:
        (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def test_check_model_dir(tmp_path):
    hf = _hf_dir(tmp_path / "hf")
    assert check_model_dir(hf) == hf.resolve()
    megatron = tmp_path / "megatron"
    (megatron / "iter_0000100").mkdir(parents=True)
    (megatron / "latest_checkpointed_iteration.txt").write_text("100")
    with pytest.raises(ModelDirError, match="is a Megatron checkpoint .*latest_checkpointed") as e:
        check_model_dir(megatron)
    assert "revisual convert" in str(e.value) and str(megatron) in str(e.value)
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with pytest.raises(ModelDirError, match="Megatron checkpoint"):
        check_model_dir(dist)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match=r"missing config.json and \*.safetensors"):
        check_model_dir(tmp_path / "empty")
    with pytest.raises(ModelDirError, match="not a directory"):
        check_model_dir(tmp_path / "nowhere")


def test_server_command(tmp_path):
    hf = _hf_dir(tmp_path / "Revisual-R1-final")
    cmd = build_server_command(hf, port=8123, max_model_len=2048, extra_args=["--enforce-eager"])
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    opts = dict(zip(cmd[3:-1:2], cmd[4::2], strict=False))
    assert opts["--model"] == str(hf.resolve())
    assert opts["--served-model-name"] == "Revisual-R1-final"
    assert opts["--host"] == "127.0.0.1" and opts["--port"] == "8123"
    assert opts["--max-model-len"] == "2048"
    assert json.loads(opts["--limit-mm-per-prompt"]) == {"image": 1, "video": 0}
    assert "--chat-template" not in cmd and cmd[-1] == "--enforce-eager"


def test_checkpoint_without_template_gets_the_qwen25vl_one(tmp_path):
    cmd = build_server_command(_hf_dir(tmp_path / "m", template=False))
    template = Path(cmd[cmd.index("--chat-template") + 1])
    assert template.read_text() == CHAT_TEMPLATE
    template.unlink()


def test_run_serve_dry_run_and_error(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    hf = _hf_dir(tmp_path / "m")
    args = parser.parse_args(
        [str(hf), "--port", "9001", "--dry-run", "--vllm-args=--enforce-eager --max-num-seqs 4"]
    )
    assert run_serve(args) == 0
    out = capsys.readouterr().out
    assert "--port 9001" in out and out.rstrip().endswith("--enforce-eager --max-num-seqs 4")
    # looks like a Megatron checkpoint, so serve tries to export it, and the export names the problem
    (tmp_path / "ckpt" / "iter_0000001").mkdir(parents=True)
    assert run_serve(parser.parse_args([str(tmp_path / "ckpt"), "--dry-run"])) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ckpt'}" in err and "not a Megatron distributed checkpoint" in err
    assert not (tmp_path / "ckpt_hf").exists()


def test_split_and_format_responses():
    text = "<think>\nArea is 6 * 2.\n</think>\nSo the area is \\boxed{12}."
    assert split_response(text) == ("Area is 6 * 2.", "12")
    assert split_response("it is 5, \\boxed{5}") == ("it is 5,", "5")
    assert split_response("no idea") == ("no idea", None)
    printed = format_responses(
        [InferResponse(text=text, finish_reason="stop"), InferResponse(text="no idea")]
    )
    assert printed == (
        "=== response 1/2 (finish: stop) ===\n--- reasoning ---\nArea is 6 * 2.\n"
        "--- answer ---\n12\n\n"
        "=== response 2/2 ===\n--- reasoning ---\nno idea\n--- answer ---\n(no boxed answer found)\n"
    )


def test_infer_bad_input(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    hf = _hf_dir(tmp_path / "m")
    args = parser.parse_args(
        ["--model", str(hf), "--image", str(tmp_path / "x.png"), "--question", "q"]
    )
    assert run_infer(args) == 2
    assert "--image" in capsys.readouterr().err
    args = parser.parse_args(
        ["--model", str(hf), "--image", "x", "--question", "q", "--num-return-sequences", "0"]
    )
    assert run_infer(args) == 2
    assert "must be >= 1" in capsys.readouterr().err
