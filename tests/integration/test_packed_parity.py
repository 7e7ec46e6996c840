"""Packed (THD) rows through our Megatron Qwen2.5-VL against transformers on the padded batch.

The three samples of test_qwen25_vl_parity (two images of different sizes; text only; a 10 x 14
patch grid that is not a multiple of the window) are packed into ONE row with
`data.packing.pack_sequences`: every token's logits must equal HF's logits for its own sample in
a right-padded batch (each sequence attends only to itself, and M-RoPE positions restart per
sequence), and so must the per-token loss and, since the loss is over the same tokens, the
gradients. Layouts: TP=1; TP=2 with sequence parallel (row padded to a multiple of 2); TP=1 with
context-parallel padding (every sequence padded to a multiple of 4) to show padding is never
attended and rope stays per token with cu_seqlens_padded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mixed_batch import mixed_batch_inputs, scaled_tiny_checkpoint

from megatron_revisual.config import load_config
from megatron_revisual.parallel import run_distributed

ROOT = Path(__file__).resolve().parents[2]

GRAD_CHECKS = {
    "language_model.embedding.word_embeddings.weight": ["model.language_model.embed_tokens.weight"],
    "vision_model.decoder.layers.0.self_attention.linear_qkv.weight": ["model.visual.blocks.0.attn.qkv.weight"],
    "language_model.decoder.layers.1.mlp.linear_fc1.weight": [
        "model.language_model.layers.1.mlp.gate_proj.weight",
        "model.language_model.layers.1.mlp.up_proj.weight",
    ],
}

# name: (tp, sequence_parallel, pack_sequences keyword arguments)
LAYOUTS = {
    "tp1": (1, False, {}),
    "tp2_sp": (2, True, {"pad_to_multiple_of": 2}),
    "tp1_cp_padding": (1, False, {"cp_size": 2}),
}


def _rank(cfg, hf_dir: str, batch) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_revisual.convert.hf_load import (
        SafetensorsReader,
        global_param_names,
        load_hf_weights,
        mapping_context,
        model_rules,
    )
    from megatron_revisual.convert.mapping import to_hf
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
    load_hf_weights(model, SafetensorsReader(hf_dir), cfg.model, tp_rank=tp_rank, tp_size=tp)
    inputs = {"pixel_values": batch.pixel_values, "image_grid_thw": batch.image_grid_thw,
              "packed_seq_params": batch.packed_seq_params}
    with torch.no_grad():
        logits = model(batch.input_ids, batch.position_ids, **inputs)
    logits = gather_from_tensor_model_parallel_region(logits)[..., : cfg.model.vocab_size]
    token_loss = model(batch.input_ids, batch.position_ids, labels=batch.labels, **inputs)
    loss = (token_loss * batch.loss_mask).sum() / batch.loss_mask.sum()
    loss.backward()

    result = {"logits": logits, "token_loss": token_loss.detach()}
    rules, ctx = model_rules(cfg.model), mapping_context(cfg.model, tp)
    params = dict(model.named_parameters())
    for local, name in global_param_names(model).items():
        if name in GRAD_CHECKS:
            grad = params[local].grad
            shards = [torch.empty_like(grad) for _ in range(tp)]
            torch.distributed.all_gather(shards, grad.contiguous(), group=ps.get_tensor_model_parallel_group())
            result[name] = to_hf(rules[name], shards, ctx)
    return result if tp_rank == 0 else {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Tiny checkpoint (QKV x4), the three samples, HF logits / per-token loss / grads of the
    right-padded batch."""
    from transformers import AutoModelForImageTextToText

    from megatron_revisual.data.packing import Sample
    from megatron_revisual.models.qwen25_vl.rope_index import MRopeIndexConfig

    hf_dir = scaled_tiny_checkpoint(tmp_path_factory.mktemp("packed") / "tiny")
    proc, inputs = mixed_batch_inputs(hf_dir)
    ids, attn, grid = inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 6], [1, 8, 12], [1, 10, 14]]

    hf = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
    out = hf(input_ids=ids, attention_mask=attn, pixel_values=inputs["pixel_values"], image_grid_thw=grid,
             mm_token_type_ids=inputs["mm_token_type_ids"])
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    loss_mask = attn.bool() & torch.cat([attn[:, 1:], torch.zeros_like(attn[:, :1])], 1).bool()
    token_loss = torch.nn.functional.cross_entropy(out.logits.float().transpose(1, 2), labels, reduction="none")
    loss = (token_loss * loss_mask).sum() / loss_mask.sum()
    loss.backward()
    hf_params = dict(hf.named_parameters())
    grads = {ours: [hf_params[n].grad.clone() for n in names] for ours, names in GRAD_CHECKS.items()}

    lengths = attn.sum(1).tolist()
    patches = grid.prod(-1).tolist()
    pixels = inputs["pixel_values"].split(patches)
    image_of_sample = [[0, 1], [], [2]]
    samples = [
        Sample(
            input_ids=ids[i, :n],
            pixel_values=torch.cat([pixels[j] for j in imgs]) if imgs else None,
            image_grid_thw=grid[imgs] if imgs else None,
        )
        for i, (n, imgs) in enumerate(zip(lengths, image_of_sample, strict=True))
    ]
    return {
        "dir": str(hf_dir), "samples": samples, "config": MRopeIndexConfig.from_hf_config(hf.config),
        "lengths": lengths, "logits": [out.logits[i, :n].detach() for i, n in enumerate(lengths)],
        "token_loss": [token_loss[i, :n].detach() for i, n in enumerate(lengths)],
        "loss_mask": [loss_mask[i, :n] for i, n in enumerate(lengths)], "grads": grads,
    }


@pytest.mark.integration
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_row_matches_hf_per_sample(reference, layout):
    from megatron_revisual.data.packing import pack_sequences

    tp, sp, pack_kwargs = LAYOUTS[layout]
    batch = pack_sequences(reference["samples"], config=reference["config"], **pack_kwargs)
    assert batch.seq_lengths == reference["lengths"]
    if layout != "tp1":  # the padded layouts do carry padding
        assert int(batch.cu_seqlens_padded[-1]) > batch.num_real_tokens
    cfg = load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [
        f"model.hf_path={reference['dir']}", f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.sequence_parallel={str(sp).lower()}", "parallel.pipeline_model_parallel_size=1",
        f"cluster.devices_per_node={tp}", "train.global_batch_size=8", "train.micro_batch_size=1",
    ])
    results = run_distributed(_rank, world_size=tp, tp=tp, args=(cfg, reference["dir"], batch), timeout_s=600)
    ours = results[0]

    report = {}
    logits = batch.unpack(ours["logits"], dim=1)
    token_loss = batch.unpack(ours["token_loss"], dim=1)
    for i, (got, want) in enumerate(zip(logits, reference["logits"], strict=True)):
        diff = report[f"logits{i}"] = (got[0] - want).abs().max().item()
        assert diff <= 1e-4, f"{layout}: sample {i} logits differ by {diff:.2e}"
        assert torch.equal(got[0].argmax(-1), want.argmax(-1)), f"{layout}: sample {i} argmax differs"
    for i, (got, want, mask) in enumerate(zip(token_loss, reference["token_loss"], reference["loss_mask"],
                                              strict=True)):
        diff = report[f"loss{i}"] = (got[0] - want)[mask].abs().max().item()
        assert diff <= 1e-4, f"{layout}: sample {i} per-token loss differs by {diff:.2e}"
    # the packed loss mask selects exactly the padded batch's loss tokens
    for got, want in zip(batch.unpack(batch.loss_mask), reference["loss_mask"], strict=True):
        assert torch.equal(got[0].bool(), want)

    for name, hf_grads in reference["grads"].items():
        for got, want in zip(ours[name], hf_grads, strict=True):
            assert want.abs().max() > 0
            rel = ((got - want).abs().max() / want.abs().max()).item()
            report[name.split(".")[-2]] = max(rel, report.get(name.split(".")[-2], 0.0))
            assert rel <= 1e-4, f"{layout}: grad of {name} differs by {rel:.2e} relative"
    print(f"\n{layout}: " + ", ".join(f"{k}={v:.1e}" for k, v in report.items()))
