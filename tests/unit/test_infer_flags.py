"""`revisual infer` takes the released infer.py's command line as it is (inference/inference.sh:
underscore flags, --do_sample True/False, --prompt appended to the question)."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

from megatron_revisual import infer
from megatron_revisual.data.chat_template import CHAT_TEMPLATE
from megatron_revisual.evaluation.prompts import REVISUAL_SYSTEM_PROMPT
from megatron_revisual.infer import (
    InferResponse,
    SamplingSettings,
    add_infer_arguments,
    run_infer,
)

QUESTION = "Which of the boxes comes next in the sequence? Select answers from A-E"


@pytest.fixture
def seen(tmp_path, monkeypatch) -> dict:
    """Both engines replaced by a recorder of the chat and sampling they are given."""
    record: dict = {}

    def engine(model_dir, image, chat, sampling, **kwargs):
        record.update(messages=chat({"type": "image"}), sampling=sampling, size=image.size)
        return [InferResponse(text="<think>look</think> so \\boxed{C}", finish_reason="stop")]

    monkeypatch.setattr(infer, "_generate_vllm", engine)
    monkeypatch.setattr(infer, "_generate_transformers", engine)
    model = tmp_path / "Revisual-R1"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    Image.new("RGB", (40, 30)).save(tmp_path / "logic1.jpg")
    record["argv"] = ["--model_path", str(model), "--image_path", str(tmp_path / "logic1.jpg")]
    return record


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    return run_infer(parser.parse_args(argv))


def test_the_released_command_line(seen, capsys):
    argv = [*seen["argv"], "--question", QUESTION, "--prompt", REVISUAL_SYSTEM_PROMPT,
            "--max_tokens", "16384", "--do_sample", "True", "--temperature", "1.0",
            "--top_p", "0.95", "--top_k", "50", "--num_return_sequences", "1"]
    assert _run(argv) == 0
    # the prompt follows the question in the user turn, as the released infer.py builds it
    assert seen["messages"] == [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTION + REVISUAL_SYSTEM_PROMPT}]}]
    assert seen["sampling"] == SamplingSettings(max_tokens=16384, temperature=1.0, top_p=0.95,
                                                top_k=50, n=1, seed=0)
    assert seen["size"] == (40, 30)
    assert "--- answer ---\nC\n" in capsys.readouterr().out


def test_do_sample_false_is_greedy_and_flags_mix(seen):
    argv = [*seen["argv"], "--question", "Find x.", "--do_sample", "False", "--max-tokens", "8",
            "--num_return_sequences", "2"]
    assert _run(argv) == 0
    assert (seen["sampling"].temperature, seen["sampling"].max_tokens, seen["sampling"].n) == (0.0, 8, 2)
    # no --prompt: the ReVisual-R1 system prompt and the question alone
    assert seen["messages"][0] == {"role": "system", "content": REVISUAL_SYSTEM_PROMPT}
    assert seen["messages"][1]["content"][1] == {"type": "text", "text": "Find x."}


def test_bad_do_sample_values(seen, capsys):
    with pytest.raises(SystemExit):
        _run([*seen["argv"], "--question", "q", "--do_sample", "maybe"])
    assert "'maybe' is not True or False" in capsys.readouterr().err
    assert _run([*seen["argv"], "--question", "q", "--do_sample", "True", "--temperature", "0"]) == 2
    assert "--do_sample True needs --temperature > 0" in capsys.readouterr().err
