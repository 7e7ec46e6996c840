"""Cold-start SFT formatting: the loss covers exactly the assistant tokens, truncation is counted,
and examples pack with `data.packing`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from megatron_revisual.data.chat_template import CHAT_TEMPLATE
from megatron_revisual.data.datasets import DatasetSpec, chat_prompt, load_prompt_dataset
from megatron_revisual.data.packing import pack_sequences
from megatron_revisual.data.sft import SFTFormatter, assistant_spans, pack_groups
from megatron_revisual.evaluation.prompts import REVISUAL_SYSTEM_PROMPT
from megatron_revisual.models.qwen25_vl.rope_index import MRopeIndexConfig
from megatron_revisual.rollout.engine import load_image
from megatron_revisual.testing import tiny_tokenizer

EOT = "<|im_end|>"
# A leading space and newlines at the edges: the cases where a BPE merge could straddle the
# prompt/response boundary if the conversation were tokenized in one piece.
RESPONSES = [
    " <think>\n2 + 3 = 5\n</think>\nThe answer is \\boxed{5}.",
    "\n<think>\nseven\n</think>\n\\boxed{7}\n",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = tiny_tokenizer.train_tokenizer(700)
    return tiny_tokenizer.save_tokenizer(tok, tmp_path_factory.mktemp("tok"), model_max_length=4096)


@pytest.fixture(scope="module")
def processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    sizes = {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": 14,
             "temporal_patch_size": 2, "merge_size": 2}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture()
def sft_data(tmp_path):
    rows = [
        {"problem": "What is 2 + 3?", "response": RESPONSES[0]},
        {"problem": "Spell 7.", "response": RESPONSES[1]},
        {"problem": "No response here."},
        {"problem": "Empty one.", "response": ""},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = DatasetSpec(path=str(path), answer_key=None, response_key="response")
    return load_prompt_dataset(spec)


def test_loss_mask_is_exactly_the_assistant_text(sft_data, tokenizer):
    assert dict(sft_data.skipped) == {"missing_response": 1, "empty_response": 1}
    fmt = SFTFormatter(tokenizer, max_length=512)
    examples = [fmt(r) for r in sft_data]
    for record, ex, response in zip(sft_data, examples, RESPONSES, strict=True):
        targets = ex.input_ids[ex.target_mask]
        assert tokenizer.decode(targets) == response + EOT
        assert targets.tolist() == tokenizer(response + EOT)["input_ids"]
        # the context is token for token the prompt a rollout engine gets for this record
        prompt_ids = tokenizer(chat_prompt(record, tokenizer))["input_ids"]
        start = int(ex.target_mask.nonzero()[0])
        assert ex.input_ids[:start].tolist() == prompt_ids
        assert "You FIRST think" in tokenizer.decode(ex.input_ids[:start])
        # the masked-in tokens are one contiguous run; after it only the template's newline
        end = int(ex.target_mask.nonzero()[-1]) + 1
        assert int(ex.target_mask.sum()) == end - start
        assert tokenizer.decode(ex.input_ids[end:]) == "\n"
    assert fmt.counts == {}

    batch = pack_sequences([e.to_sample() for e in examples], config=None, pad_to_multiple_of=8)
    trained = batch.labels[batch.loss_mask.bool()]
    assert tokenizer.decode(trained) == RESPONSES[0] + EOT + RESPONSES[1] + EOT
    assert int(batch.loss_mask.sum()) == sum(e.num_target_tokens for e in examples)
    assert batch.seq_lengths == [e.num_tokens for e in examples]


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": REVISUAL_SYSTEM_PROMPT},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "\\boxed{2}"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "\\boxed{4}"},
    ]
    full, spans = assistant_spans(messages, tokenizer)
    assert [full[a:b] for a, b in spans] == ["\\boxed{2}" + EOT, "\\boxed{4}" + EOT]
    ex = SFTFormatter(tokenizer, max_length=512).tokenize(messages)
    assert tokenizer.decode(ex.input_ids[ex.target_mask]) == "\\boxed{2}" + EOT + "\\boxed{4}" + EOT
    assert tokenizer.decode(ex.input_ids) == full
    with pytest.raises(ValueError, match="no assistant turn"):
        assistant_spans(messages[:2], tokenizer)


def test_truncation_is_counted(sft_data, tokenizer):
    record = sft_data[0]
    full = SFTFormatter(tokenizer, max_length=512)(record)
    start = int(full.target_mask.nonzero()[0])
    fmt = SFTFormatter(tokenizer, max_length=start + 3)
    cut = fmt(record)
    assert cut.truncated and cut.num_tokens == start + 3 and cut.num_target_tokens == 3
    assert torch.equal(cut.input_ids, full.input_ids[: start + 3])
    none_left = SFTFormatter(tokenizer, max_length=start)
    assert none_left(record) is None
    assert none_left.counts == {"no_target_tokens": 1}
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]
    assert not fmt.tokenize(short).truncated  # fits: not counted
    assert fmt.counts == {"truncated": 1}


def test_image_conversation_expands_placeholders_and_packs(tmp_path, tokenizer, processor):
    Image.new("RGB", (56, 56), "white").save(tmp_path / "a.png")
    row = {"problem": "<image>How many dots?", "response": "\\boxed{0}", "images": ["a.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    data = load_prompt_dataset(
        DatasetSpec(path=str(tmp_path / "d.jsonl"), answer_key=None, response_key="response",
                    format_prompt=None)
    )
    fmt = SFTFormatter(tokenizer, max_length=512, processor=processor)
    ex = fmt(data[0])
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ex.image_grid_thw.tolist() == [[1, 4, 4]]
    assert tuple(ex.pixel_values.shape) == (16, 3 * 2 * 14 * 14)
    assert int((ex.input_ids == image_id).sum()) == 4  # 16 patches / (2 x 2 merge)
    assert not bool(ex.target_mask[ex.input_ids == image_id].any())
    assert tokenizer.decode(ex.input_ids[ex.target_mask]) == "\\boxed{0}" + EOT
    # the context is what the HF processor makes of the rollout prompt, pixels included
    hf = processor(text=[chat_prompt(data[0], tokenizer)], images=[load_image(data[0].images[0])],
                   return_tensors="pt")
    start = int(ex.target_mask.nonzero()[0])
    assert ex.input_ids[:start].tolist() == hf["input_ids"][0].tolist()
    assert torch.equal(ex.pixel_values, hf["pixel_values"])
    config = MRopeIndexConfig(
        image_token_id=image_id, video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>")
    )
    batch = pack_sequences([ex.to_sample(), ex.to_sample()], config=config)
    assert batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 4]]
    assert tuple(batch.position_ids.shape) == (3, 1, 2 * ex.num_tokens)

    first_image = int((ex.input_ids == image_id).nonzero()[0])
    cutter = SFTFormatter(tokenizer, max_length=first_image + 2, processor=processor)
    assert cutter(data[0]) is None and cutter.counts == {"image_truncated": 1}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                {"role": "assistant", "content": "A"}]
    assert fmt.tokenize(messages, images=[b"not an image"]) is None
    literal = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<|image_pad|>"}]
    assert fmt.tokenize(literal) is None
    assert fmt.counts == {"unreadable_image": 1, "image_count_mismatch": 1}
    with pytest.raises(ValueError, match="give SFTFormatter a processor"):
        SFTFormatter(tokenizer, max_length=512)(data[0])


def test_pack_groups_keeps_order_within_the_budget():
    assert pack_groups([5, 3, 4, 8, 1, 2], max_tokens=8) == [[0, 1], [2], [3], [4, 5]]
    assert pack_groups([], max_tokens=8) == []
    with pytest.raises(ValueError, match="sample 1 has 9 tokens > max_tokens=8"):
        pack_groups([1, 9], max_tokens=8)
