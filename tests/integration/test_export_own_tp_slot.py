"""`stream_hf_tensors(own_tp_slot=True)`, the weight sync into an engine of the trainer's TP
size, on 4 gloo ranks at TP 2 x PP 2 (and TP 2 x PP 1 for the traffic count).

Each rank streams a model loaded from a tiny HF checkpoint and compares what it receives with
the file: the decoder layers' row- and column-parallel tensors must hold the file's values in
this rank's TP slot (the slice vLLM's loaders cut for the engine's TP rank: rows for q/k/v,
gate/up and their biases, columns for o_proj and down_proj) and NaN in the peer's; every other
tensor must equal the file whole. The TP traffic must be exactly the gathers of the tensors that are still gathered:
(TP - 1) x the bytes of this rank's TP-split parameters outside the decoder layers."""

from __future__ import annotations

import pytest

from megatron_revisual.parallel import run_distributed

pytestmark = pytest.mark.integration

ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def slot_rank(hf_dir: str) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_revisual.convert.dist_ckpt import model_config_from_hf, run_config_for
    from megatron_revisual.convert.export import ExportTraffic, stream_hf_tensors
    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.convert.safetensors_io import HFCheckpoint
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_world_size()
    model_cfg = model_config_from_hf(hf_dir, "fp32")
    cfg = run_config_for(model_cfg, tp, pp)
    model = build_qwen25_vl(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    load_hf_weights(model, SafetensorsReader(hf_dir), model_cfg, tp_rank=tp_rank, tp_size=tp)
    reader = HFCheckpoint(hf_dir)
    traffic = ExportTraffic()
    whole, slotted, wrong = [], [], []
    for name, tensor in stream_hf_tensors(model, model_cfg, bucket_bytes=1 << 16, own_tp_slot=True, traffic=traffic):
        ref = reader.get(name).to(tensor.dtype)
        if name.startswith("model.layers.") and ref.ndim >= 1 and not name.endswith("layernorm.weight"):
            dim = 1 if name.endswith(ROW_PARALLEL) else 0
            size = ref.shape[dim] // tp
            ok = tensor.shape == ref.shape and torch.equal(tensor.narrow(dim, tp_rank * size, size),
                                                          ref.narrow(dim, tp_rank * size, size))
            # the peer's slot is NaN: an engine that read it would fail loudly
            ok = ok and bool(tensor.isnan().sum() == ref.numel() - ref.numel() // tp)
            slotted.append(name)
        else:
            ok = torch.equal(tensor, ref)
            whole.append(name)
        if not ok:
            wrong.append(name)
    gathered = ExportTraffic()
    for _ in stream_hf_tensors(model, model_cfg, bucket_bytes=1 << 16, traffic=gathered):
        pass
    split_outside = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                        if getattr(p, "tensor_model_parallel", False) and not n.startswith("language_model.decoder."))
    return {"whole": whole, "slotted": slotted, "wrong": wrong, "tp_bytes_sent": traffic.tp_bytes_sent,
            "expected_tp_bytes": (tp - 1) * split_outside, "pp_bytes_received": traffic.pp_bytes_received,
            "pp_bytes_received_gathered": gathered.pp_bytes_received, "tp_bytes_sent_gathered": gathered.tp_bytes_sent,
            "own_slot_tensors": len(traffic.own_slot_tensors), "tp_rank": tp_rank}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("own_slot") / "hf", seed=3))


@pytest.mark.parametrize("pp", [1, 2])
def test_each_rank_gets_its_own_slot_without_gathering_the_decoder(hf_dir, pp):
    ranks = run_distributed(slot_rank, world_size=2 * pp, tp=2, pp=pp, args=(hf_dir,), timeout_s=600)
    assert [r["tp_rank"] for r in ranks] == [0, 1] * pp
    names = ranks[0]["whole"] + ranks[0]["slotted"]
    for r in ranks:
        assert r["wrong"] == []
        assert r["whole"] + r["slotted"] == names  # every rank: every tensor, once, same order
        assert r["tp_bytes_sent"] == r["expected_tp_bytes"] > 0
    # 2 layers x (q, k, v weights and biases, o_proj, gate, up, down): all from the local shard,
    # 5 Megatron parameters per layer (linear_qkv weight and bias, linear_proj, fc1, fc2)
    assert len(ranks[0]["slotted"]) == 2 * 10
    assert sum(r["own_slot_tensors"] for r in ranks[:2]) == 2 * 2 * 5 // pp
    assert all(r["tp_bytes_sent_gathered"] > r["tp_bytes_sent"] for r in ranks)
    if pp == 2:
        # a decoder layer crosses the PP group as the owner's shard, not as the whole HF tensor
        assert all(0 < r["pp_bytes_received"] < r["pp_bytes_received_gathered"] for r in ranks)
