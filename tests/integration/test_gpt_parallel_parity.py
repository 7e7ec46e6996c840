"""Tensor, pipeline and sequence parallelism change nothing numerically, on CPU over gloo.

What this proves: a Megatron-Core GPTModel with the Qwen2.5 LM block structure (RMSNorm from
`megatron_revisual.parallel.norm`, SwiGLU, GQA, QKV bias, rope, untied embeddings; fp32, no
dropout), built through `megatron_revisual.parallel` (`run_distributed` + `initialize_parallel`
+ `local_gpt_block_spec`), runs Megatron's real pipeline schedule (4 micro-batches, forward and
backward, Megatron DDP + finalize_model_grads) at (TP, PP) = (2,1), (1,2), (2,2) and at TP=2 with
sequence parallel, and on the same weights and data gives
- the same loss for every micro-batch as TP=PP=1, and
- the same gradient for EVERY parameter as TP=PP=1 once the TP shards are gathered (fused QKV,
  gate/up fc1, proj, fc2, embeddings, output layer, all norms incl. the SP all-reduced ones)
  and local layer numbers are mapped to global ones across PP stages,
both within 1e-5 (absolute).

The full weights are drawn once (at TP=PP=1, from a seed, all parameters incl. norm weights and
QKV biases randomized so that no shard is trivially right) and sharded into each layout here,
using Megatron's `tensor_model_parallel` / `partition_dim` parameter attributes. fc1 holds
[gate; up] under gated linear units and a TP shard holds [gate_shard; up_shard], so it is split
per half; fused QKV is stored per query group, so a contiguous split (by groups) is right.

Run: .venv/bin/python -m pytest tests/integration/test_gpt_parallel_parity.py -q
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from megatron_revisual.parallel import RankError, run_distributed

pytestmark = pytest.mark.integration

NUM_LAYERS = 4
HIDDEN = 64
HEADS = 4
QUERY_GROUPS = 2
FFN = 128
VOCAB = 128
SEQ = 32
MICRO_BATCH = 2
NUM_MICRO_BATCHES = 4
TOLERANCE = 1e-5
FC1_NAMES = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")

# name: (tp, pp, sequence_parallel)
LAYOUTS = {
    "tp2": (2, 1, False),
    "pp2": (1, 2, False),
    "tp2_pp2": (2, 2, False),
    "tp2_sp": (2, 1, True),
}


def _config(tp: int, pp: int, sequence_parallel: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=QUERY_GROUPS,
        ffn_hidden_size=FFN,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def _random_full_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """O(1)-scale values for every parameter, so gradients are large against the tolerance."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith("layernorm.weight") or name.endswith("final_layernorm.weight"):
            weights[name] = 1.0 + 0.1 * noise
        elif param.dim() == 1:
            weights[name] = 0.1 * noise
        else:
            weights[name] = noise / param.shape[-1] ** 0.5
    return weights


def _global_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> name at PP=1, from each layer's (global, 1-based) layer_number."""
    local_to_global_layer = {
        f"decoder.layers.{index}.": f"decoder.layers.{layer.layer_number - 1}."
        for index, layer in enumerate(model.decoder.layers)
    }
    names = {}
    for name, _ in model.named_parameters():
        global_name = name
        for local_prefix, global_prefix in local_to_global_layer.items():
            if name.startswith(local_prefix):
                global_name = global_prefix + name[len(local_prefix) :]
                break
        names[name] = global_name
    return names


def _tp_shard(name: str, full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if name.endswith(FC1_NAMES):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def _tp_gather(name: str, shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    if name.endswith(FC1_NAMES):
        halves = [shard.chunk(2, dim=dim) for shard in shards]
        gate = torch.cat([half[0] for half in halves], dim=dim)
        up = torch.cat([half[1] for half in halves], dim=dim)
        return torch.cat([gate, up], dim=dim)
    return torch.cat(shards, dim=dim)


def _train_step_on_rank(
    tp: int,
    pp: int,
    sequence_parallel: bool,
    tokens: torch.Tensor,
    full_weights: dict[str, torch.Tensor] | None,
) -> dict:
    """Build the model for this rank's stage, load (or, at TP=PP=1 without weights, draw) the
    weights, run one forward+backward pipeline schedule; return losses and gradients."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_revisual.parallel.specs import local_gpt_block_spec

    config = _config(tp, pp, sequence_parallel)
    model = GPTModel(
        config=config,
        transformer_layer_spec=local_gpt_block_spec(config),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        parallel_output=True,
    )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    global_names = _global_names(model)
    if full_weights is None:
        assert tp == pp == 1, "only the TP=PP=1 reference draws the weights"
        full_weights = _random_full_weights(model, seed=20250604)
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = full_weights[global_names[name]]
            if getattr(param, "tensor_model_parallel", False):
                full = _tp_shard(global_names[name], full, param.partition_dim, tp_rank, tp)
            assert full.shape == param.shape, (name, full.shape, param.shape)
            param.copy_(full)

    ddp_model = DistributedDataParallel(
        config=config, ddp_config=DistributedDataParallelConfig(), module=model
    )
    config.finalize_model_grads_func = finalize_model_grads
    ddp_model.zero_grad_buffer()

    def loss_func(per_token_loss: torch.Tensor):
        loss = per_token_loss.float().mean()
        # Cloned: the schedule scales the returned loss in place.
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
        output = chunk(
            input_ids=batch[:, :-1],
            position_ids=positions,
            attention_mask=None,
            labels=batch[:, 1:],
        )
        return output, loss_func

    started = time.perf_counter()
    loss_dicts = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(tokens),
        model=[ddp_model],
        num_microbatches=NUM_MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    elapsed = time.perf_counter() - started
    grads = {
        global_names[name]: (
            param.main_grad.detach().clone(),
            param.partition_dim if getattr(param, "tensor_model_parallel", False) else None,
        )
        for name, param in model.named_parameters()
    }
    return {
        "tp_rank": tp_rank,
        "losses": [float(d["loss"]) for d in loss_dicts] if loss_dicts else None,
        "grads": grads,
        "weights": full_weights if (tp == pp == 1) else None,
        "schedule_s": elapsed,
    }


def _micro_batches() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (NUM_MICRO_BATCHES, MICRO_BATCH, SEQ + 1), generator=generator)


@pytest.fixture(scope="module")
def reference() -> dict:
    (result,) = run_distributed(
        _train_step_on_rank,
        world_size=1,
        args=(1, 1, False, _micro_batches(), None),
        timeout_s=300,
    )
    assert len(result["losses"]) == NUM_MICRO_BATCHES
    return result


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_tp1_pp1(layout: str, reference: dict) -> None:
    tp, pp, sequence_parallel = LAYOUTS[layout]
    started = time.perf_counter()
    results = run_distributed(
        _train_step_on_rank,
        world_size=tp * pp,
        tp=tp,
        pp=pp,
        args=(tp, pp, sequence_parallel, _micro_batches(), reference["weights"]),
        timeout_s=300,
    )
    wall = time.perf_counter() - started

    last_stage = [r for r in results if r["losses"] is not None]
    assert len(last_stage) == tp, f"expected losses from the {tp} last-stage ranks"
    loss_diff = max(
        abs(got - want)
        for r in last_stage
        for got, want in zip(r["losses"], reference["losses"], strict=True)
    )
    assert loss_diff <= TOLERANCE, (layout, [r["losses"] for r in last_stage], reference["losses"])

    shards: dict[str, dict[int, torch.Tensor]] = {}
    partition_dims: dict[str, int | None] = {}
    for r in results:
        for name, (grad, dim) in r["grads"].items():
            shards.setdefault(name, {})[r["tp_rank"]] = grad
            partition_dims[name] = dim
    assert set(shards) == set(reference["grads"]), "parameter sets differ from the reference"

    grad_diff: dict[str, float] = {}
    for name, per_rank in shards.items():
        want = reference["grads"][name][0]
        assert sorted(per_rank) == list(range(tp)), (name, sorted(per_rank))
        if partition_dims[name] is None:
            # Replicated over TP (norms, incl. SP-reduced ones): every rank must hold the full grad.
            grad_diff[name] = max(float((g - want).abs().max()) for g in per_rank.values())
        else:
            got = _tp_gather(name, [per_rank[k] for k in range(tp)], partition_dims[name])
            grad_diff[name] = float((got - want).abs().max())
    worst = max(grad_diff, key=grad_diff.get)
    print(
        f"\n[{layout}] wall {wall:.1f}s, schedule {max(r['schedule_s'] for r in results):.2f}s, "
        f"max |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff[worst]:.2e} ({worst})"
    )
    assert grad_diff[worst] <= TOLERANCE, {k: v for k, v in grad_diff.items() if v > TOLERANCE}
    # The kinds of weights the layouts shard differently must all have been compared.
    for kind in (
        "linear_qkv.weight",
        "linear_qkv.bias",
        "linear_proj.weight",
        "linear_fc1.weight",
        "linear_fc2.weight",
        "input_layernorm.weight",
        "final_layernorm.weight",
        "embedding.word_embeddings.weight",
        "output_layer.weight",
    ):
        assert any(name.endswith(kind) for name in grad_diff), kind


def test_reference_gradients_are_not_trivial(reference: dict) -> None:
    """Guards the 1e-5 tolerance: it only means something against O(1e-3)+ gradients."""
    for name, (grad, _) in reference["grads"].items():
        assert float(grad.abs().max()) > 1e-3, name
    losses = reference["losses"]
    assert len(set(losses)) == NUM_MICRO_BATCHES, losses


def _fail_on_rank_one() -> int:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 would hang here without the harness killing it
    return 0


def test_rank_failure_raises_with_its_traceback() -> None:
    started = time.perf_counter()
    with pytest.raises(RankError, match="deliberate failure on rank 1") as info:
        run_distributed(_fail_on_rank_one, world_size=2, timeout_s=120)
    assert info.value.rank == 1
    assert "_fail_on_rank_one" in info.value.remote_traceback
    assert time.perf_counter() - started < 120


def _exit_without_result() -> None:
    os._exit(3)


def test_rank_that_dies_silently_is_reported() -> None:
    with pytest.raises(RankError, match="exited with code 3 without a result"):
        run_distributed(_exit_without_result, world_size=1, timeout_s=120)


def _sleep_forever() -> None:
    time.sleep(3600)


def test_hung_rank_times_out() -> None:
    started = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 1 did not finish within timeout_s=5"):
        run_distributed(_sleep_forever, world_size=1, timeout_s=5)
    assert time.perf_counter() - started < 30
