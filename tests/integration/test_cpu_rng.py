"""Megatron's model-parallel RNG streams on CPU ranks: what the RNG redirects of
`parallel.cpu_compat` are for.

Megatron seeds the "CUDA" default stream with the data-parallel seed and keeps one stream per
TP rank (seed + 2718 + tp_rank) that `get_cuda_rng_tracker().fork()` switches to, e.g. for
dropout inside tensor-parallel regions. On CPU all of them live in the CPU generator. Without
the redirects the CUDA seeding and stream switching are queued by `torch.cuda._lazy_call` and
never run: no error, but every TP rank would draw the same "model-parallel" numbers.
"""

from __future__ import annotations

import pytest
import torch

from megatron_revisual.parallel import run_distributed

pytestmark = pytest.mark.integration

SEED = 1234
MODEL_PARALLEL_OFFSET = 2718  # Megatron's model_parallel_cuda_manual_seed


def _draws() -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    before = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        model_parallel = torch.rand(4)
    after = torch.rand(4)
    return {
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "before": before, "model_parallel": model_parallel, "after": after,
    }


def _stream(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def test_tp_ranks_share_the_default_stream_and_fork_their_own() -> None:
    ranks = run_distributed(_draws, world_size=2, tp=2, seed=SEED)
    default = _stream(SEED, 8)
    for rank in ranks:
        tp_rank = rank["tp_rank"]
        assert torch.equal(rank["before"], default[:4]), f"tp rank {tp_rank}: default stream"
        model_parallel = _stream(SEED + MODEL_PARALLEL_OFFSET + tp_rank, 4)
        assert torch.equal(rank["model_parallel"], model_parallel), f"tp rank {tp_rank}: forked"
        # leaving the fork puts the default stream back where it was
        assert torch.equal(rank["after"], default[4:]), f"tp rank {tp_rank}: after the fork"
    assert not torch.equal(ranks[0]["model_parallel"], ranks[1]["model_parallel"])
