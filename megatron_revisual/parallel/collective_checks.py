"""Collective checks of a rehearsal (`revisual rehearse`, `RunConfig.rehearsal`), installed in
every rank before training:

    checks = CollectiveChecks.install(cfg.rehearsal)     # collective: builds its groups
    ...one training step...
    row.update(checks.end_of_step("mrl", 3))               # collective: raises on a mismatch

Every forward pass of a TransformerBlock is counted, with gradients or without. Transformer
Engine's FP8 reduces its amax over the amax group (every rank of a pipeline stage: TP x DP x CP,
`parallel_state.get_amax_reduction_group(with_context_parallel=True)`) once per forward with
gradients, where Megatron enters the FP8 context (the block's forward under the delayed recipe),
so every rank of that group must run the same number of forwards: `end_of_step` compares the
counts over each group and raises `CollectiveMismatch` naming the ranks and their counts.

With `fp8_amax_stand_in`, each forward with gradients also runs that all-reduce (one number, over a
gloo copy of the amax group made with `collective_timeout_s`), as the recipe's FP8 would: a rank
whose peers never join fails after the timeout with the group's ranks and its own forward count,
where NCCL would hang until its watchdog. The stand-in runs where TE cannot (CPU); it is a mock
of TE's reduction, not TE.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_revisual.parallel.device import comm_device

__all__ = ["CollectiveChecks", "CollectiveMismatch"]


class CollectiveMismatch(RuntimeError):
    """Ranks of one group ran different numbers of collective-issuing forwards."""


class CollectiveChecks:
    def __init__(self, *, stand_in: bool, timeout_s: float, groups: list[list[int]], mine: Any) -> None:
        self.stand_in, self.timeout_s = stand_in, timeout_s
        self.groups = groups  # the amax groups' ranks, every rank's view
        self.mine = mine  # this rank's gloo copy of its amax group (stand-in only)
        self.my_ranks = next(g for g in groups if dist.get_rank() in g)
        self.with_grad = 0
        self.without_grad = 0
        self._restore: Callable[[], None] | None = None

    @classmethod
    def install(cls, rehearsal: Any) -> CollectiveChecks:
        """Collective over the world (after `initialize_parallel`): patches TransformerBlock's
        forward in this process; `uninstall` puts it back."""
        from megatron.core import parallel_state as ps

        world = dist.get_world_size()
        # every rank's pipeline stage: the amax groups are the ranks of each stage (TP x DP x CP)
        device = comm_device(None)
        stage = torch.tensor([ps.get_pipeline_model_parallel_rank()], dtype=torch.int64, device=device)
        stages = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(stages, stage)
        groups = [[r for r in range(world) if int(stages[r]) == s] for s in sorted({int(x) for x in stages})]
        mine = None
        if rehearsal.fp8_amax_stand_in:
            timeout = datetime.timedelta(seconds=rehearsal.collective_timeout_s)
            for ranks in groups:  # every rank creates every group, in the same order
                group = dist.new_group(ranks, backend="gloo", timeout=timeout)
                if dist.get_rank() in ranks:
                    mine = group
        checks = cls(stand_in=rehearsal.fp8_amax_stand_in, timeout_s=rehearsal.collective_timeout_s,
                     groups=groups, mine=mine)
        checks._patch()
        return checks

    def _patch(self) -> None:
        from megatron.core.transformer import transformer_block

        block = transformer_block.TransformerBlock
        original = block.forward
        checks = self

        def forward(module, *args, **kwargs):
            out = original(module, *args, **kwargs)
            if torch.is_grad_enabled():
                checks.with_grad += 1
                if checks.stand_in:
                    checks._amax_all_reduce()
            else:
                checks.without_grad += 1
            return out

        block.forward = forward

        def restore() -> None:
            block.forward = original

        self._restore = restore

    def _amax_all_reduce(self) -> None:
        try:
            dist.all_reduce(torch.ones(1), op=dist.ReduceOp.MAX, group=self.mine)
        except RuntimeError as e:
            raise CollectiveMismatch(
                f"rank {dist.get_rank()}: the FP8 amax all-reduce (stand-in for Transformer Engine's, "
                f"over the amax group of ranks {self.my_ranks}) of this rank's forward "
                f"{self.with_grad} with gradients in this step found no peer within {self.timeout_s:g} s: "
                f"the group's ranks ran different numbers of forward passes ({e})"
            ) from e

    def end_of_step(self, stage: str, step: int) -> dict[str, float]:
        """Collective: the step's forward counts of every rank, compared within each amax group;
        the counts start again from 0. Returns this rank's counts as metrics."""
        device = comm_device(None)
        mine = torch.tensor([self.with_grad, self.without_grad], dtype=torch.int64, device=device)
        every = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        for ranks in self.groups:
            counts = {r: tuple(int(x) for x in every[r]) for r in ranks}
            if len(set(counts.values())) > 1:
                raise CollectiveMismatch(
                    f"[{stage}] step {step}: the ranks of one amax group (TP x DP x CP) ran different "
                    f"numbers of forward passes (with gradients, without): "
                    + ", ".join(f"rank {r}: {c}" for r, c in counts.items())
                    + "; with FP8 (or any collective in a forward) these ranks would deadlock"
                )
        self.with_grad = self.without_grad = 0
        return {"checks/forwards_with_grad": float(mine[0]), "checks/forwards_without_grad": float(mine[1])}

    def uninstall(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None
