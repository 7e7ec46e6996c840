"""The one-process torch_dist writer (`convert.direct` + `convert.distcp_write`, used for
hf-to-mcore at TP = PP = 1) writes what Megatron's own save path writes for the same model: the
same .metadata entries (keys, global shapes, dtypes, chunks), every record byte for byte, and a
metadata.json that names the same backend. Loading at other layouts is then Megatron's business
on files it wrote itself (tests/integration/test_convert_roundtrip.py loads this writer's output
at TP 2 / PP 2 and checks the logits)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from megatron_revisual.convert.safetensors_io import HFCheckpoint
from megatron_revisual.testing.tiny_checkpoint import TinySpec, make_tiny_checkpoint


def _megatron_save(model_cfg, hf_dir: str, out: str) -> int:
    from megatron_revisual.convert.dist_ckpt import _hf_to_mcore_rank

    return _hf_to_mcore_rank([(model_cfg, hf_dir, out)])


def _records(ckpt) -> dict:
    """{(key, offsets): record bytes} and the metadata's entries."""
    with open(ckpt / ".metadata", "rb") as f:
        md = pickle.load(f)
    out = {}
    for index, info in md.storage_data.items():
        with open(ckpt / info.relative_path, "rb") as f:
            f.seek(info.offset)
            out[(index.fqn, tuple(index.offset or ()))] = f.read(info.length)
    return out, md.state_dict_metadata


@pytest.mark.parametrize(
    ("tied", "vocab_multiple"), [(False, 64), (True, 1)], ids=["untied", "tied_padded_vocab"]
)
def test_direct_writer_writes_megatrons_checkpoint(tmp_path, tied, vocab_multiple):
    from megatron_revisual.convert.direct import hf_to_mcore_tp1
    from megatron_revisual.convert.dist_ckpt import model_config_from_hf
    from megatron_revisual.convert.dist_io import DistCheckpointReader, launch
    from megatron_revisual.convert.mapping import padded_vocab_size

    spec = TinySpec(tie_word_embeddings=tied, vocab_multiple=vocab_multiple)
    hf = make_tiny_checkpoint(tmp_path / "hf", seed=3, spec=spec)
    model_cfg = model_config_from_hf(hf, "fp32")
    direct, megatron = tmp_path / "direct", tmp_path / "megatron"
    direct.mkdir()
    megatron.mkdir()
    written = hf_to_mcore_tp1(model_cfg, HFCheckpoint(hf), direct)
    assert launch(_megatron_save, tp=1, pp=1, args=(model_cfg, str(hf), str(megatron))) == [written]

    ours, our_md = _records(direct)
    theirs, their_md = _records(megatron)
    assert our_md == their_md
    assert sorted(ours) == sorted(theirs)
    # objects: an _extra_state per linear (4 a layer, 2 in the merger) and the common state
    n_objects = sum(1 for k in ours if not k[1])
    assert n_objects == 4 * spec.num_hidden_layers + 4 * spec.vision_depth + 2 + 1
    assert len(ours) - n_objects == 49 - tied  # tensor chunks (fc1 and its bias: two each)
    for key, record in theirs.items():
        assert ours[key] == record, f"record {key} differs"
    assert json.loads((direct / "metadata.json").read_text()) == json.loads(
        (megatron / "metadata.json").read_text()
    )
    assert sorted(p.name for p in direct.iterdir()) == sorted(p.name for p in megatron.iterdir())
    # the bytes are the parameters: the embedding's rows are HF's, then zero padding
    emb = HFCheckpoint(hf).get("model.embed_tokens.weight")
    key = "language_model.embedding.word_embeddings.weight"
    stored = DistCheckpointReader(direct).read(key, (0, 0), tuple(our_md[key].size))
    assert torch.equal(stored[: emb.shape[0]], emb)
    assert stored.shape[0] == padded_vocab_size(emb.shape[0], 1) == 768
    assert emb.shape[0] == (768 if vocab_multiple == 64 else 714)
    assert not stored[emb.shape[0] :].any()
