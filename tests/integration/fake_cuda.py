"""Fake CUDA for CPU tests: catch a host tensor that would reach a GPU kernel or an NCCL call.

On a machine without a GPU every tensor is a CPU tensor, so code that forgets to move a batch
to the GPU, or hands a host tensor to an NCCL collective, runs fine here and dies on the cluster.
`fake_cuda()` gives every tensor a logical device, "cuda" or "cpu", while the data stay on the
CPU (the CPU redirects of `parallel.cpu_compat` must be installed, as `initialize_parallel` does):

- a tensor made with a CUDA device (`device="cuda"`, `device=0`, `torch.cuda.current_device()`,
  which returns 0 inside), moved with `.to("cuda")` / `.cuda()`, or computed from such tensors is
  "cuda"; one made without a device, or moved with `.cpu()`, is "cpu"; others are unknown;
- an op whose tensor arguments are on both logical devices raises `DeviceLeak`, as CUDA would
  ("Expected all tensors to be on the same device"), except where CUDA allows it: 0-dim host
  tensors (CPU scalars), copies between devices, host index tensors;
- the default process group is NCCL as far as callers can tell (`dist.get_backend` says "nccl"),
  and a collective given a host tensor raises `DeviceLeak`, as NCCL refuses it. The collective
  then runs on gloo, on the same data.

A mock, by necessity: there is no CUDA device here. It is checked against the real mistakes it
stands for (test_fake_cuda.py beside it). Tensors it never saw made (autograd's gradients are
given their parameter's device) are unknown and pass every check, so it can miss a leak, never
invent one. Per thread, like every TorchFunctionMode: CPU autograd runs backward on the caller's
thread.

    with fake_cuda() as fake:
        model = build_model()                 # parameters made on torch.cuda.current_device()
        batch = pack(...)                     # host tensors
        model(batch.input_ids)                # DeviceLeak: the batch was never moved
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["DeviceLeak", "FakeCuda", "fake_cuda"]

CUDA, CPU = "cuda", "cpu"
_FAKE_DEVICE = torch.device("cuda", 0)


class DeviceLeak(RuntimeError):
    """A host tensor where CUDA or NCCL would refuse it."""


def _device_of_argument(device: Any) -> str | None:
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return CUDA
    if isinstance(device, (str, torch.device)):
        return CUDA if str(device).startswith("cuda") else CPU
    return None


# Methods that move data between devices or take host indices: CUDA allows mixed devices here.
_UNCHECKED = {
    torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.copy_, torch.Tensor.__getitem__,
    torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put,
}
# Results that keep the device of the tensor they were taken from.
_SAME_PLACE = {
    torch.Tensor.__getitem__, torch.Tensor.index_put, torch.Tensor.data.__get__,
    torch.Tensor.grad.__get__, torch.Tensor._base.__get__,  # autograd makes gradients beside their tensor
}
# Property getters that answer for the logical device.
_DEVICE_GETTER = torch.Tensor.device.__get__
_IS_CUDA_GETTER = torch.Tensor.is_cuda.__get__
_GET_DEVICE = torch.Tensor.get_device


class FakeCuda(TorchFunctionMode):
    """The mode behind `fake_cuda()`; `device(t)` is a tensor's logical device (None: unknown)."""

    def __init__(self) -> None:
        super().__init__()
        self._tags = WeakTensorKeyDictionary()

    def device(self, t: Any) -> str | None:
        return self._tags.get(t) if isinstance(t, torch.Tensor) else None

    def to_cuda(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module.cuda()`: its parameters and buffers are on the (logical) GPU. Megatron builds
        them there directly on a GPU; here they were made on the host (CPU initialisation)."""
        for t in (*module.parameters(), *module.buffers()):
            self._tags[t] = CUDA
        return module

    def mark(self, tree: Any, device: str) -> Any:
        for t in tree_flatten(tree)[0]:
            if isinstance(t, torch.Tensor):
                self._tags[t] = device
        return tree

    def check_collective(self, name: str, tree: Any) -> None:
        for t in tree_flatten(tree)[0]:
            if isinstance(t, torch.Tensor) and self.device(t) == CPU:
                raise DeviceLeak(f"torch.distributed.{name} on NCCL got a host tensor {tuple(t.shape)} "
                                 f"{t.dtype}; NCCL takes device tensors only")

    def _target(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        """The device an explicit move or factory argument asks for."""
        if func is torch.Tensor.cpu:
            return CPU
        if func is torch.Tensor.to:
            if "device" in kwargs:
                return _device_of_argument(kwargs["device"])
            for a in args[1:]:
                if isinstance(a, torch.Tensor):
                    return self.device(a)
                found = _device_of_argument(a) if not isinstance(a, torch.dtype) else None
                if found is not None:
                    return found
            return None
        return _device_of_argument(kwargs.get("device"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == _DEVICE_GETTER:
            return _FAKE_DEVICE if self.device(args[0]) == CUDA else func(*args, **kwargs)
        if func == _IS_CUDA_GETTER:
            return self.device(args[0]) == CUDA
        if func is _GET_DEVICE:
            return 0 if self.device(args[0]) == CUDA else -1
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        known = [(self.device(t), t) for t in tensors if self.device(t) is not None]
        # CUDA takes 0-dim host tensors beside device ones (CPU scalars)
        devices = {d for d, t in known if not (d == CPU and t.dim() == 0)}
        if len(devices) > 1 and func not in _UNCHECKED and func not in _SAME_PLACE:
            shapes = ", ".join(f"{d} {tuple(t.shape)}" for d, t in known)
            raise DeviceLeak(f"{getattr(func, '__qualname__', func)}: tensors on cuda and on the host ({shapes})")
        target = self._target(func, args, kwargs)
        out = func(*args, **kwargs)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func in _SAME_PLACE:
            target = self.device(first)
        elif target is not None and out is first and func in (torch.Tensor.to, torch.Tensor.cpu):
            if self.device(first) != target:
                out = out.clone()  # a real move copies: the original keeps its own device
        elif target is None:
            if out is first and self.device(first) is not None:
                return out  # in place (copy_, add_, ...): where it was
            if func is torch.Tensor.to:
                target = self.device(first)  # a dtype change stays put
            elif devices or known:
                target = CUDA if CUDA in devices else CPU
            elif not tensors:
                target = CPU  # a factory without a device
        if target is not None and out is not None:
            self.mark(out, target)
        return out


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                "reduce", "all_to_all_single", "send", "recv", "isend", "irecv", "_all_gather_base",
                "_reduce_scatter_base", "reduce_scatter")


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """Logical devices and an NCCL stand-in for the `with` block (see the module docstring)."""
    from megatron_revisual.parallel import cpu_compat

    if cpu_compat._device_mode is None:
        raise RuntimeError("fake_cuda() needs the CPU redirects installed (initialize_parallel)")
    mode = FakeCuda()
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def checked(name: str, real: Any) -> Any:
        def collective(*args: Any, **kwargs: Any) -> Any:
            mode.check_collective(name, (args, kwargs))
            return real(*args, **kwargs)

        return collective

    real_get_backend = dist.get_backend
    patch(dist, "get_backend",
          lambda group=None: "nccl" if real_get_backend(group) == "gloo" else real_get_backend(group))
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            patch(dist, name, checked(name, getattr(dist, name)))
    patch(torch.cuda, "current_device", lambda: 0)
    patch(torch.Tensor, "cuda", lambda self, *args, **kwargs: self.to("cuda"))
    try:
        with mode:
            yield mode
    finally:
        while saved:
            owner, name, value = saved.pop()
            setattr(owner, name, value)
