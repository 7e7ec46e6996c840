"""Context parallelism (CP=2) inside Qwen25VLModel on 2 gloo ranks, without attending across ranks.

The local core attention cannot exchange keys between CP ranks, so every layer's core attention
is replaced by a probe that records the (rotated) query/key it receives and returns zeros. With
attention out of the way every remaining operation is per token, so each CP rank must reproduce
exactly its rows (`cp_token_indices`) of the same probed model run at CP=1 on the full row:
- the decoder input (embeddings with the vision embeddings scattered in): bitwise equal;
- the rotary frequencies handed to the decoder: the full row's, bitwise equal to CP=1's;
- the rotated query/key of every layer, i.e. Megatron's THD rope on this rank's tokens picks the
  frequency rows of exactly those tokens;
- the per-token loss, computed by the model against labels it split itself; and the loss of the
  two ranks put back with `cp_unsplit` equals the full row's.
Separately, the rope applied on each CP rank to a known query equals an independent M-RoPE
(written here from the Qwen2.5-VL formula) applied to the full row, then sliced.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_revisual.config import load_config
from megatron_revisual.parallel import run_distributed
from megatron_revisual.parallel.context_parallel import cp_rank_indices, cp_unsplit

ROOT = Path(__file__).resolve().parents[2]
CP = 2


def _probe_attention(model, captured: dict) -> None:
    for i, layer in enumerate(model.language_model.decoder.layers):
        def probe(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                  packed_seq_params=None, _i=i):
            captured[f"q{_i}"], captured[f"k{_i}"] = query.detach().clone(), key.detach().clone()
            return query.new_zeros(query.shape[0], 1, query.shape[-2] * query.shape[-1])
        layer.self_attention.core_attention.forward = probe


def _rank(cfg, hf_dir: str, batch) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.models.qwen25_vl.model import (
        cp_token_indices,
        split_for_context_parallel,
    )
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl

    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
    load_hf_weights(model, SafetensorsReader(hf_dir), cfg.model, tp_rank=0, tp_size=1)
    captured: dict = {}

    def on_decoder(module, args, kwargs):
        captured["decoder_input"] = kwargs["hidden_states"].detach().clone()
        captured["freqs"] = kwargs["rotary_pos_emb"].detach().clone()

    model.language_model.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True)
    _probe_attention(model, captured)
    params = batch.packed_seq_params
    with torch.no_grad():
        token_loss = model(batch.input_ids, batch.position_ids, labels=batch.labels,
                           pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                           packed_seq_params=params)
        index = cp_token_indices(params)
        # the same known query on every rank and layout (full row), each rank rotating its rows
        probe_q = torch.randn(batch.input_ids.shape[1], 2, model.config.kv_channels,
                              generator=torch.Generator().manual_seed(0))
        freqs = model.language_model.rotary_pos_emb(batch.position_ids, model.config.mrope_section)
        rotated = apply_rotary_pos_emb(probe_q[index], freqs, model.config,
                                       cu_seqlens=params.cu_seqlens_q_padded,
                                       cp_group=ps.get_context_parallel_group())
    return {
        **captured, "token_loss": token_loss, "index": index, "rotated": rotated,
        "labels": split_for_context_parallel(batch.labels, params),
        "loss_mask": split_for_context_parallel(batch.loss_mask, params),
        "cp_rank": ps.get_context_parallel_rank(), "probe_q": probe_q,
    }


def _mrope_reference(q: torch.Tensor, position_ids: torch.Tensor, section: list[int], base: float) -> torch.Tensor:
    """Qwen2.5-VL's M-RoPE on q [T, heads, d] with positions [3, 1, T] (rotate-half layout)."""
    d = q.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = position_ids[:, 0, :, None].double() * inv_freq  # [3, T, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [3, T, d]
    # channel block j takes its angle from axis j % 3 (temporal, height, width), twice over
    per_axis = angles.split(section * 2, dim=-1)
    angles = torch.cat([block[j % 3] for j, block in enumerate(per_axis)], dim=-1)[:, None, :]
    q64 = q.double()
    rotated_half = torch.cat([-q64[..., d // 2:], q64[..., : d // 2]], dim=-1)
    return q64 * angles.cos() + rotated_half * angles.sin()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from transformers import AutoConfig, AutoProcessor

    from megatron_revisual.data.packing import Sample, pack_sequences
    from megatron_revisual.demo import demo_image
    from megatron_revisual.models.qwen25_vl.rope_index import MRopeIndexConfig
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    hf_dir = tmp_path_factory.mktemp("cp") / "tiny"
    make_tiny_checkpoint(hf_dir, seed=5)
    proc = AutoProcessor.from_pretrained(hf_dir)
    chats = [
        [{"type": "image"}, {"type": "text", "text": "Describe the figure."}],
        [{"type": "text", "text": "What is 3 + 4? Think step by step."}],
        [{"type": "image"}, {"type": "text", "text": "And this one?"}],
    ]
    images = [demo_image(84, 56), demo_image(196, 140)]
    image_of_sample = [[0], [], [1]]
    samples = []
    for chat, imgs in zip(chats, image_of_sample, strict=True):
        text = proc.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True)
        inputs = proc(text=[text], images=[images[j] for j in imgs] or None, return_tensors="pt")
        samples.append(Sample(input_ids=inputs["input_ids"][0], pixel_values=inputs.get("pixel_values"),
                              image_grid_thw=inputs.get("image_grid_thw")))
    config = MRopeIndexConfig.from_hf_config(AutoConfig.from_pretrained(hf_dir))
    batch = pack_sequences(samples, config=config, cp_size=CP)
    return str(hf_dir), batch


def _cfg(hf_dir: str, cp: int):
    return load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [
        f"model.hf_path={hf_dir}", "parallel.tensor_model_parallel_size=1",
        "parallel.sequence_parallel=false", "parallel.pipeline_model_parallel_size=1",
        f"parallel.context_parallel_size={cp}", f"cluster.devices_per_node={cp}",
        "train.global_batch_size=8", "train.micro_batch_size=1",
    ])


@pytest.mark.integration
def test_cp2_ranks_hold_exactly_their_rows_of_the_full_row(packed):
    hf_dir, batch = packed
    cu_pad = batch.cu_seqlens_padded
    total = int(cu_pad[-1])
    assert all(n % (2 * CP) == 0 for n in cu_pad.diff().tolist())
    assert int(batch.cu_seqlens[-1]) < total  # the CP padding is really there

    cfg1 = _cfg(hf_dir, 1)
    cfg2 = _cfg(hf_dir, CP)
    (full,) = run_distributed(_rank, world_size=1, args=(cfg1, hf_dir, batch), timeout_s=600)
    ranks = run_distributed(_rank, world_size=CP, cp=CP, args=(cfg2, hf_dir, batch), timeout_s=600)
    assert full["decoder_input"].shape[0] == total
    assert full["token_loss"].shape == (1, total)

    want_rot = _mrope_reference(full["probe_q"], batch.position_ids, cfg2.model.mrope_section, cfg2.model.rotary_base)
    for rank, got in enumerate(ranks):
        idx = cp_rank_indices(cu_pad, CP, rank)
        assert got["cp_rank"] == rank and torch.equal(got["index"], idx)
        # (1) decoder input: exactly this rank's rows of the full embedding-with-vision
        assert got["decoder_input"].shape[0] == total // CP
        assert torch.equal(got["decoder_input"], full["decoder_input"][idx])
        # (2) rotary: full-row frequencies on every rank, rows picked inside the THD rope
        assert torch.equal(got["freqs"], full["freqs"]) and got["freqs"].shape[0] == total
        assert (got["rotated"].double() - want_rot[idx]).abs().max() < 1e-5
        assert (full["rotated"].double() - want_rot).abs().max() < 1e-5
        probed = [k for k in full if k[0] in "qk" and k[1:].isdigit()]
        assert len(probed) == 2 * cfg2.model.num_layers
        for name in probed:
            diff = (got[name] - full[name][idx]).abs().max().item()
            assert diff <= 1e-5, f"rank {rank}: {name} differs from the full row's rows by {diff:.2e}"
        # (3) labels / loss mask: split with the model's indices, and the loss follows them
        assert torch.equal(got["labels"], batch.labels[:, idx])
        assert torch.equal(got["loss_mask"], batch.loss_mask[:, idx])
        assert got["token_loss"].shape == (1, total // CP)
        diff = (got["token_loss"] - full["token_loss"][:, idx]).abs().max().item()
        assert diff <= 1e-5, f"rank {rank}: per-token loss differs by {diff:.2e}"
    joined = cp_unsplit([r["token_loss"] for r in ranks], cu_pad, CP, seq_dim=1)
    assert (joined - full["token_loss"]).abs().max() <= 1e-5
    assert float((joined * batch.loss_mask).sum()) == pytest.approx(
        float((full["token_loss"] * batch.loss_mask).sum()), rel=1e-6)
