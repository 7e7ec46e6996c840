"""Vocab-parallel log-probs and entropy at TP=2 on gloo equal the full-vocabulary computation.

Two processes, each holding half of the vocabulary; values and the gradient of each shard are
compared with torch.log_softmax on the full logits (fp32, 1e-6). Self-contained: it does not use
megatron_revisual.parallel.
"""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_revisual.rl.logprobs import vocab_parallel_log_probs_and_entropy

pytestmark = pytest.mark.integration

TP = 2
VOCAB = 2 * 37  # per-rank shard of 37
SHAPE = (3, 9)  # [batch, tokens]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(*SHAPE, VOCAB, generator=g) * 3
    targets = torch.randint(0, VOCAB, SHAPE, generator=g)
    targets[0, :4] = torch.tensor([0, VOCAB // 2 - 1, VOCAB // 2, VOCAB - 1])  # shard edges
    w_lp = torch.randn(SHAPE, generator=g)
    w_h = torch.randn(SHAPE, generator=g)
    return logits, targets, w_lp, w_h


def _reference() -> dict[str, torch.Tensor]:
    logits, targets, w_lp, w_h = _full_problem()
    logits.requires_grad_(True)
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    h = -(logp.exp() * logp).sum(-1)
    (w_lp * lp + w_h * h).sum().backward()
    lp_only = torch.autograd.grad(
        (w_lp * torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum(),
        logits,
    )[0]
    return {"lp": lp.detach(), "h": h.detach(), "grad": logits.grad, "grad_lp_only": lp_only}


def _worker(rank: int, port: int, out_dir: str) -> None:
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP
        )
        logits, targets, w_lp, w_h = _full_problem()
        shard_size = VOCAB // TP
        shard = (
            logits[..., rank * shard_size : (rank + 1) * shard_size].clone().requires_grad_(True)
        )

        lp, h = vocab_parallel_log_probs_and_entropy(shard, targets, group=dist.group.WORLD)
        (w_lp * lp + w_h * h).sum().backward()
        grad_both = shard.grad.clone()

        # log-probs alone (the entropy output unused: its gradient arrives as None)
        shard.grad = None
        lp2 = vocab_parallel_log_probs_and_entropy(shard, targets, group=dist.group.WORLD)[0]
        (w_lp * lp2).sum().backward()

        # Without group= the default is Megatron's TP group: an error before it exists ...
        try:
            vocab_parallel_log_probs_and_entropy(shard, targets)
            default_group_error = ""
        except RuntimeError as exc:
            default_group_error = str(exc)
        # ... and the same numbers once Megatron has built it (TP=2 over both ranks).
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
        lp_default, h_default = vocab_parallel_log_probs_and_entropy(shard.detach(), targets)

        torch.save(
            {
                "lp": lp.detach(),
                "h": h.detach(),
                "grad": grad_both,
                "grad_lp_only": shard.grad.clone(),
                "default_group_error": default_group_error,
                "lp_default": lp_default,
                "h_default": h_default,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        parallel_state.destroy_model_parallel()
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_tp2_gloo_matches_full_vocabulary(tmp_path: "os.PathLike[str]") -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=TP, join=True)
    ref = _reference()
    shard_size = VOCAB // TP
    for rank in range(TP):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        sl = slice(rank * shard_size, (rank + 1) * shard_size)
        assert torch.allclose(got["lp"], ref["lp"], atol=1e-6, rtol=0)
        assert torch.allclose(got["h"], ref["h"], atol=1e-6, rtol=0)
        assert torch.allclose(got["grad"], ref["grad"][..., sl], atol=1e-6, rtol=0)
        assert torch.allclose(got["grad_lp_only"], ref["grad_lp_only"][..., sl], atol=1e-6, rtol=0)
        assert "Megatron's tensor-parallel group is not" in got["default_group_error"]
        assert torch.equal(got["lp_default"], got["lp"]) and torch.equal(got["h_default"], got["h"])
