"""The device a rank computes on, and the device each collective needs.

Batches are built on the host (tokenizing, packing, image preprocessing) and cross to the compute
device once, at the model's door (`to_device`, in `train.schedule.run_packed_schedule`). Values
the step reads back on the host (counts, metrics, log-probs kept for bookkeeping) come back once.
Collectives take their tensor on the device the group's backend needs (`comm_device`): NCCL
refuses host tensors, gloo takes host tensors; `all_reduce` here moves a tensor there and back.

    compute_device()          # cuda:<torch.cuda.current_device()>, else the CPU (tests may set it)
    packed = to_device(packed)                             # dataclasses, dicts, lists of tensors
    counts = all_reduce(torch.tensor([n_tokens, n_rows]), group=ps.get_data_parallel_group())

On a CPU run the compute device is the CPU and gloo takes it as it is: nothing moves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_reduce", "broadcast_object", "comm_device", "compute_device", "set_compute_device", "to_device"]

_device: torch.device | None = None


def set_compute_device(device: torch.device | str | None) -> None:
    """This rank's compute device from now on (None: the default, see `compute_device`)."""
    global _device
    _device = None if device is None else torch.device(device)


def compute_device() -> torch.device:
    """The set device; else the current CUDA device when CUDA is available; else the CPU."""
    if _device is not None:
        return _device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device(group: Any = None) -> torch.device:
    """The device a collective over `group` (None: the default group) takes its tensors on:
    the host for gloo, the compute device for NCCL (and any other accelerator backend)."""
    return torch.device("cpu") if str(dist.get_backend(group)) == "gloo" else compute_device()


def all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None) -> torch.Tensor:
    """`dist.all_reduce` of a copy of `tensor` on the device `group` needs; the result comes back
    on `tensor`'s device (a host count stays a host count). `tensor` itself is left as it was."""
    on_comm = tensor.to(comm_device(group), copy=True)
    dist.all_reduce(on_comm, op=op, group=group)
    return on_comm.to(tensor.device)


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """`src`'s `obj` on every rank (pickled; NCCL carries it on the current CUDA device, gloo on
    the host). Collective: every rank of `group` calls it, the others with any placeholder."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def to_device[T](obj: T, device: torch.device | None = None) -> T:
    """`obj` with every tensor in it on `device` (default: the compute device), through
    dataclasses (frozen ones are rebuilt), dicts, lists and tuples; other values unchanged."""
    device = compute_device() if device is None else device
    return _move(obj, device)


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        # asynchronous host-to-device copies only: a device-to-host one could be read unfinished
        return obj.to(device, non_blocking=device.type != "cpu")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _move(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, dict):
        return type(obj)((k, _move(v, device)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_move(v, device) for v in obj)
    return obj
