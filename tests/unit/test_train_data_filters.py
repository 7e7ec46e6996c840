"""Load-time filters of the training stages: the validation set gets the training set's
(prompts too long for the rollout are skipped and counted), SFT rows whose prompt leaves no
room for a response are skipped at load, and a validation run that scores nothing says why."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from megatron_revisual.config.schema import DataConfig
from megatron_revisual.data.datasets import chat_prompt, dataset_spec, load_prompt_dataset
from megatron_revisual.data.sft import load_sft_set
from megatron_revisual.testing import tiny_tokenizer
from megatron_revisual.train.grpo_loop import load_validation_set, validation_report
from megatron_revisual.train.stage_common import skipped_report

QUESTIONS = ["Hi", "What is 2 + 3?", "What is the sum of all the numbers in this long list?"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = tiny_tokenizer.train_tokenizer(700)
    return tiny_tokenizer.save_tokenizer(tok, tmp_path_factory.mktemp("tok"), model_max_length=512)


@pytest.fixture
def data(tmp_path, tokenizer):
    """Three rows of growing prompt length, and those lengths (chat-templated, in tokens)."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"problem": q, "answer": "1", "response": "It is 1."}) + "\n"
                            for q in QUESTIONS))
    config = DataConfig(path=str(path), format_prompt="none", response_key="response")
    lengths = [len(tokenizer(chat_prompt(r, tokenizer))["input_ids"])
               for r in load_prompt_dataset(dataset_spec(config))]
    assert lengths == sorted(set(lengths))
    return config, lengths


def test_the_validation_set_skips_and_counts_prompts_too_long_for_the_rollout(data, tokenizer):
    config, lengths = data
    stage = SimpleNamespace(validation=SimpleNamespace(data=config, every=2),
                            rollout=SimpleNamespace(max_prompt_length=lengths[1]))
    val = load_validation_set(stage, tokenizer)
    assert [r.prompt for r in val] == QUESTIONS[:2]
    assert skipped_report("data/val_skipped", val.skipped) == {"data/val_skipped/prompt_too_long": 1}
    stage.validation.every = 0
    assert load_validation_set(stage, tokenizer) is None


def test_sft_rows_without_room_for_a_response_are_skipped_at_load(data, tokenizer):
    config, lengths = data
    # max_length = the middle prompt's length: that prompt fills it, not one response token fits
    sft = load_sft_set(SimpleNamespace(data=config, max_length=lengths[1]), tokenizer)
    assert [r.prompt for r in sft] == QUESTIONS[:1]
    assert skipped_report("data/skipped", sft.skipped) == {"data/skipped/no_room_for_response": 2}
    roomy = load_sft_set(SimpleNamespace(data=config, max_length=lengths[1] + 1), tokenizer)
    assert len(roomy) == 2 and dict(roomy.skipped) == {"no_room_for_response": 1}


def test_a_validation_run_that_scores_nothing_warns_with_the_reason():
    out, warning = validation_report(4, [], [], {"prompt_too_long": 3, "unreadable_image": 1})
    assert out == {"val/prompts": 4.0, "val/skipped_requests": 4.0,
                   "val/skipped/prompt_too_long": 3.0, "val/skipped/unreadable_image": 1.0}
    assert warning == ("validation scored nothing: the engine skipped 4 of 4 prompts "
                       "(prompt_too_long: 3, unreadable_image: 1)")
    samples = [SimpleNamespace(token_ids=[1, 2, 3]), SimpleNamespace(token_ids=[4])]
    out, warning = validation_report(3, samples, [{"accuracy": 1.0}, {"accuracy": 0.0}],
                                     {"prompt_too_long": 2})
    assert warning is None
    assert out == {"val/prompts": 3.0, "val/skipped_requests": 2.0, "val/skipped/prompt_too_long": 2.0,
                   "val/accuracy": 0.5, "val/response_length": 2.0}
    assert not any(math.isnan(v) for v in out.values())
