"""Run Megatron-Core on CPU (gloo) by redirecting its hard-coded CUDA calls.

Megatron-Core 0.19 assumes a GPU in a handful of places (device placement, the CUDA RNG used
by its model-parallel RNG tracker, tensor-type strings asserted by its optimizers, the current
CUDA stream in its gradient sync). On a machine
without a GPU, `install_cpu_compat()` points exactly those places at the CPU. This module is the
only place in the project where such redirects live; on a machine with a GPU it does nothing.

The device rewriting is a `TorchFunctionMode`, which is per thread: it is pushed for the thread
that calls `install_cpu_compat()` (the rank's main thread, which is also where CPU autograd runs
backward). Code that creates CUDA tensors from other threads is not covered.

Deliberately left alone: `torch.cuda.manual_seed_all` (no Megatron-Core caller; the call from
`torch.manual_seed` is queued by `torch.cuda._lazy_call` and never runs, harmlessly),
`_lazy_call` itself (its one Megatron-Core user, `_set_cuda_rng_state`, is replaced) and
`torch.cuda.set_rng_state` (its callers, the rerun state machine and Megatron-FSDP, restore the
CPU generator with `torch.set_rng_state` beside it, from a state saved at the same moment: on CPU
the same state; the CUDA call alone is queued and never runs, harmlessly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")

# (owner, attribute name, original value) of every redirect, so tests can undo them.
_originals: list[tuple[Any, str, Any]] = []
_device_mode: TorchFunctionMode | None = None


def _is_cuda_device(device: object) -> bool:
    # A bare int as a device is a CUDA index (torch.empty(..., device=0), t.to(0)).
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuDeviceMode(TorchFunctionMode):
    """Rewrites a CUDA `device` argument to the CPU in every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        # Tensor.to(device, ...) takes the device positionally.
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _DropSharedGeneratorWarning(logging.Filter):
    # On CPU the "GPU" RNG streams of CudaRNGStatesTracker.fork live in the CPU generator, so
    # its check that the CPU RNG is untouched inside a fork fails by construction, every fork.
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


_warning_filter = _DropSharedGeneratorWarning()


def _redirect(owner: Any, name: str, replacement: Callable[..., Any]) -> None:
    _originals.append((owner, name, getattr(owner, name)))
    setattr(owner, name, replacement)


def _cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _seed_cpu_generator(seed: int) -> None:
    # Not torch.manual_seed: that also calls torch.cuda.manual_seed_all, and redirecting either
    # CUDA seeding function to torch.manual_seed recurses.
    torch.default_generator.manual_seed(int(seed))


_original_tensor_type = torch.Tensor.type


def _cuda_style_type(
    self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any
):
    if dtype is None and not kwargs:
        name = _original_tensor_type(self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            return "torch.cuda." + name.removeprefix("torch.")
        return name
    return _original_tensor_type(self, dtype, non_blocking, **kwargs)


def install_cpu_compat() -> bool:
    """Point Megatron-Core's CUDA assumptions at the CPU; idempotent, a no-op with a GPU.
    Returns whether this call installed them (the caller then owns `uninstall_cpu_compat`)."""
    global _device_mode
    if torch.cuda.is_available() or _device_mode is not None:
        return False
    from megatron.core.tensor_parallel import random as mcore_random

    # GPTModel, attention, DotProductAttention, p2p_communication and TransformerLayer pass
    # device=torch.cuda.current_device().
    _redirect(torch.cuda, "current_device", lambda: _CPU)
    # tensor_parallel.data.broadcast_data, language_module (tied embeddings across PP),
    # clip_vit_model, dist_checkpointing.exchange_utils and optimizer state loading call .cuda().
    _redirect(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    # dist_checkpointing's save/load strategies synchronize the device.
    _redirect(torch.cuda, "synchronize", lambda device=None: None)
    # The DDP gradient sync (param_and_grad_buffer.start_grad_sync) takes the current stream to
    # wait on CUDA-graph events; torch's CPU stream has the same methods, as no-ops.
    _redirect(torch.cuda, "current_stream", torch.cpu.current_stream)
    # CudaRNGStatesTracker.add (model_parallel_cuda_manual_seed) reads the CUDA RNG state.
    _redirect(torch.cuda, "get_rng_state", _cpu_rng_state)
    # CudaRNGStatesTracker.add seeds the per-TP-rank stream with it; the original is queued and
    # never run, silently giving every TP rank the same "model-parallel" stream.
    _redirect(torch.cuda, "manual_seed", _seed_cpu_generator)
    # CudaRNGStatesTracker.fork switches streams through these two: the getter indexes
    # torch.cuda.default_generators (empty without a GPU), the setter goes through _lazy_call
    # and would silently never run. Replacing the setter is why _lazy_call needs no redirect.
    _redirect(mcore_random, "_get_cuda_rng_state", _cpu_rng_state)
    _redirect(mcore_random, "_set_cuda_rng_state", _set_cpu_rng_state)
    # optimizer.py, distrib_optimizer.py and clip_grads.py assert 'torch.cuda.FloatTensor'.
    _redirect(torch.Tensor, "type", _cuda_style_type)
    # schedules.py (torch.zeros(..., device="cuda")), the default causal mask of
    # DotProductAttention, and Tensor.to with a CUDA device.
    _device_mode = _CudaToCpuDeviceMode()
    _device_mode.__enter__()
    logging.getLogger(mcore_random.__name__).addFilter(_warning_filter)
    return True


def uninstall_cpu_compat() -> None:
    """Undo `install_cpu_compat()`: a process that ran ranks in-process (a one-rank conversion,
    a test) gets torch's own CUDA functions back."""
    global _device_mode
    if _device_mode is None:
        return
    _device_mode.__exit__(None, None, None)
    _device_mode = None
    logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_warning_filter)
    while _originals:
        owner, name, original = _originals.pop()
        setattr(owner, name, original)
