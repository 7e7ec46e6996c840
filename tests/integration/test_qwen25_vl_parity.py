"""Our Megatron Qwen2.5-VL, loaded from a tiny random HF checkpoint through convert.mapping,
against transformers' Qwen2_5_VLForConditionalGeneration: logits on a mixed batch and
gradients after a loss backward, at every (TP, PP) layout and with sequence parallel.

The batch: one sample with two images of different sizes, one text-only sample, one image whose
patch grid (10 x 14) is not a multiple of the attention window; right-padded, so causal
attention never lets a real token see padding. QKV weights are scaled up in the checkpoint so
that attention is far from uniform and a rope or window mistake shows in the logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mixed_batch import mixed_batch_inputs, scaled_tiny_checkpoint

from megatron_revisual.config import load_config
from megatron_revisual.parallel import run_distributed

ROOT = Path(__file__).resolve().parents[2]

# (name of our parameter, HF module path of the parameter(s) it maps to)
GRAD_CHECKS = {
    "language_model.embedding.word_embeddings.weight": ["model.language_model.embed_tokens.weight"],
    "vision_model.decoder.layers.0.self_attention.linear_qkv.weight": ["model.visual.blocks.0.attn.qkv.weight"],
    "language_model.decoder.layers.1.mlp.linear_fc1.weight": [
        "model.language_model.layers.1.mlp.gate_proj.weight",
        "model.language_model.layers.1.mlp.up_proj.weight",
    ],
}


def _rank(cfg, hf_dir: str, batch: dict) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
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
    model = build_qwen25_vl(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    load_hf_weights(model, SafetensorsReader(hf_dir), cfg.model, tp_rank=tp_rank, tp_size=tp)
    b, s = batch["input_ids"].shape
    schedule = get_forward_backward_func()

    def run(with_labels: bool):
        def forward_step(data_iterator, m):
            x = next(data_iterator)
            out = m(
                x["input_ids"], x["position_ids"], labels=x["labels"] if with_labels else None,
                pixel_values=x["pixel_values"], image_grid_thw=x["image_grid_thw"],
            )

            def loss_func(output):
                if not with_labels:
                    return output.sum() * 0, {"logits": gather_from_tensor_model_parallel_region(output).detach()}
                mask = x["loss_mask"].float()
                loss = (output.float() * mask).sum() / mask.sum()
                return loss, {"loss": loss.detach().clone()}

            return out, loss_func

        return schedule(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=s, micro_batch_size=b, forward_only=not with_labels,
        )

    result: dict = {}
    logits = run(with_labels=False)
    if ps.is_pipeline_last_stage():
        result["logits"] = logits[0]["logits"][..., : cfg.model.vocab_size]
    model.zero_grad()
    losses = run(with_labels=True)
    if ps.is_pipeline_last_stage():
        result["loss"] = losses[0]["loss"].item()

    rules, ctx = model_rules(cfg.model), mapping_context(cfg.model, tp)
    params = dict(model.named_parameters())
    for local, name in global_param_names(model).items():
        if name not in GRAD_CHECKS:
            continue
        grad = params[local].grad
        shards = [torch.empty_like(grad) for _ in range(tp)]
        torch.distributed.all_gather(shards, grad.contiguous(), group=ps.get_tensor_model_parallel_group())
        result[name] = to_hf(rules[name], shards, ctx)
    return result if tp_rank == 0 else {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Tiny checkpoint (QKV scaled x4), the mixed batch, HF logits and HF gradients."""
    from transformers import AutoModelForImageTextToText

    from megatron_revisual.models.qwen25_vl.rope_index import MRopeIndexConfig, rope_index

    hf_dir = scaled_tiny_checkpoint(tmp_path_factory.mktemp("parity") / "tiny")
    proc, inputs = mixed_batch_inputs(hf_dir)
    ids, attn, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    if ids.shape[1] % 2:  # sequence parallel at TP=2 splits the sequence in two
        ids = torch.cat([ids, torch.full((ids.shape[0], 1), proc.tokenizer.pad_token_id)], 1)
        attn = torch.cat([attn, torch.zeros(attn.shape[0], 1, dtype=attn.dtype)], 1)
        types = torch.cat([types, torch.zeros(types.shape[0], 1, dtype=types.dtype)], 1)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 12], [1, 10, 14]]

    hf = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    loss_mask = attn.bool() & torch.cat([attn[:, 1:], torch.zeros_like(attn[:, :1])], 1).bool()
    # mm_token_type_ids: without it transformers 5.19 gives image tokens text positions.
    out = hf(input_ids=ids, attention_mask=attn, pixel_values=inputs["pixel_values"],
             image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=types)
    logp = torch.log_softmax(out.logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss = -(logp * loss_mask).sum() / loss_mask.sum()
    loss.backward()
    hf_params = dict(hf.named_parameters())
    grads = {ours: [hf_params[n].grad.clone() for n in names] for ours, names in GRAD_CHECKS.items()}

    positions, _ = rope_index(ids, inputs["image_grid_thw"], attention_mask=attn,
                              config=MRopeIndexConfig.from_hf_config(hf.config))
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels, "loss_mask": loss_mask,
             "pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    return {"dir": str(hf_dir), "batch": batch, "logits": out.logits.detach(), "mask": attn.bool(),
            "loss": loss.item(), "grads": grads}


LAYOUTS = {
    "tp1_pp1": (1, 1, False),
    "tp2_pp1": (2, 1, False),
    "tp1_pp2": (1, 2, False),
    "tp2_pp2": (2, 2, False),
    "tp2_sp": (2, 1, True),
}


@pytest.mark.integration
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_and_grads_match_hf(reference, layout):
    tp, pp, sp = LAYOUTS[layout]
    cfg = load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [
        f"model.hf_path={reference['dir']}", f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}", f"parallel.sequence_parallel={str(sp).lower()}",
        f"cluster.devices_per_node={tp * pp}", "train.global_batch_size=8", "train.micro_batch_size=1",
    ])
    results = run_distributed(_rank, world_size=tp * pp, tp=tp, pp=pp, args=(cfg, reference["dir"], reference["batch"]),
                              timeout_s=600)
    merged: dict = {}
    for r in results:
        merged.update(r)

    mask = reference["mask"]
    ours, ref = merged["logits"], reference["logits"]
    assert ours.shape == ref.shape
    assert (ours - ref)[mask].abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1)[mask], ref.argmax(-1)[mask])
    assert merged["loss"] == pytest.approx(reference["loss"], abs=1e-5)

    for name, hf_grads in reference["grads"].items():
        for got, want in zip(merged[name], hf_grads, strict=True):
            assert want.abs().max() > 0
            rel = ((got - want).abs().max() / want.abs().max()).item()
            assert rel <= 1e-4, f"{layout}: grad of {name} differs by {rel:.2e} relative"
