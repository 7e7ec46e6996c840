"""The transformers rollout engine: checkpoint names, weight updates, where a sample ends.

Sampling behaviour (n, seeds, stop, top-k/p, skipped requests) is checked against both engines
in tests/integration/test_rollout_vllm.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_revisual.convert.hf_load import SafetensorsReader
from megatron_revisual.rollout.engine import HFEngineConfig
from megatron_revisual.rollout.hf_engine import HFEngine, checkpoint_parameter_names
from megatron_revisual.rollout.types import RolloutEngineError, RolloutRequest, SamplingConfig

SETTINGS = {"dtype": "float32", "max_model_len": 512}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_revisual.testing.tiny_checkpoint import DEFAULT_SPEC, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("hf_engine")
    tied = dataclasses.replace(DEFAULT_SPEC, tie_word_embeddings=True)
    return {
        "vl_a": make_tiny_checkpoint(root / "vl_a", seed=0),
        "vl_b": make_tiny_checkpoint(root / "vl_b", seed=1),
        "lm": make_tiny_checkpoint(root / "lm", text_only=True, seed=3, spec=tied),
    }


@pytest.fixture(scope="module")
def vl_engine(tiny):
    return HFEngine(HFEngineConfig(model_path=str(tiny["vl_a"]), **SETTINGS))


def test_checkpoint_names_are_the_saved_names(tiny, vl_engine):
    from transformers import AutoModelForCausalLM

    names = checkpoint_parameter_names(vl_engine.model)
    assert set(names) == set(SafetensorsReader(tiny["vl_a"]).names())
    assert (
        names["model.layers.1.mlp.up_proj.weight"]
        == "model.language_model.layers.1.mlp.up_proj.weight"
    )
    assert names["visual.blocks.0.attn.qkv.bias"] == "model.visual.blocks.0.attn.qkv.bias"
    assert names["lm_head.weight"] == "lm_head.weight"
    lm = AutoModelForCausalLM.from_pretrained(tiny["lm"], dtype=torch.float32)
    lm_names = checkpoint_parameter_names(lm)
    # tied: the saved checkpoint has no lm_head.weight, and neither do the names
    assert (
        set(lm_names) == set(SafetensorsReader(tiny["lm"]).names()) and "lm_head.weight" not in lm_names
    )
    assert lm_names["model.embed_tokens.weight"] == "model.embed_tokens.weight"


def test_update_weights_loads_every_tensor_by_checkpoint_name(tiny, vl_engine):
    from transformers import AutoModelForImageTextToText

    reader = SafetensorsReader(tiny["vl_b"])
    stats = vl_engine.update_weights(
        ((n, reader.get(n)) for n in sorted(reader.names())), bucket_bytes=1 << 17
    )
    want = AutoModelForImageTextToText.from_pretrained(
        tiny["vl_b"], dtype=torch.float32
    ).state_dict()
    got = vl_engine.model.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert stats.tensors == 57 and stats.bytes == sum(
        reader.get(n).numel() * 4 for n in reader.names()
    )
    assert stats.max_bucket_bytes <= max(1 << 17, 768 * 128 * 4) and stats.buckets >= 20


def test_update_weights_rejects_unknown_names_and_shapes(vl_engine):
    with pytest.raises(
        RolloutEngineError, match="'model.language_model.norm.weight' is not a tensor"
    ):
        vl_engine.update_weights([("model.language_model.norm.weight", torch.ones(128))])
    with pytest.raises(
        RolloutEngineError,
        match=r"'model.norm.weight' has shape \(64,\), the model's model.language_model.norm.weight is \(128,\)",
    ):
        vl_engine.update_weights([("model.norm.weight", torch.ones(64))])


def test_tied_model_ignores_a_streamed_lm_head(tiny):
    engine = HFEngine(HFEngineConfig(model_path=str(tiny["lm"]), **SETTINGS))
    embedding = engine.model.get_input_embeddings().weight
    new = torch.randn_like(embedding)
    stats = engine.update_weights([("model.embed_tokens.weight", new), ("lm_head.weight", new * 0)])
    assert stats.tensors == 2
    assert torch.equal(engine.model.get_output_embeddings().weight, new)  # tied: one tensor


def test_where_a_sample_ends(vl_engine):
    tok = vl_engine.preparer.tokenizer
    eos = tok.eos_token_id
    words = tok.encode("alpha beta gamma delta", add_special_tokens=False)
    # EOS kept in the tokens, dropped from the text; what follows (padding) is cut
    ids, text, finish, reason = vl_engine._finish([*words, eos, 5, 6], ())
    assert (ids, text, finish, reason) == ([*words, eos], "alpha beta gamma delta", "stop", None)
    assert vl_engine._finish(words, ())[2:] == ("length", None)
    # a stop string: cut after the token completing it, the text ends before it
    ids, text, finish, reason = vl_engine._finish([*words, eos], ("ma d", "zzz"))
    assert text == "alpha beta gam" and finish == "stop" and reason == "ma d"
    assert (
        ids == words[: len(ids)]
        and "ma d" in tok.decode(ids)
        and "ma d" not in tok.decode(ids[:-1])
    )


def test_greedy_samples_repeat_and_cpu_has_nothing_to_free(tiny, vl_engine):
    prompt = vl_engine.preparer.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say something."}], add_generation_prompt=True, tokenize=False
    )
    batch = vl_engine.generate(
        [RolloutRequest(prompt=prompt)], SamplingConfig(n=3, max_tokens=4, temperature=0)
    )
    assert [s.sample_index for s in batch.samples] == [0, 1, 2]
    assert (
        batch.samples[0].token_ids == batch.samples[2].token_ids
        and len(batch.samples[0].token_ids) == 4
    )
    assert not vl_engine.capabilities.sleep and vl_engine.free_memory() is False
    assert vl_engine.capabilities.sleep_note == "the model already lives in host memory"
