"""fake_cuda.py (the stand-in for CUDA and NCCL of the leak test): the mistakes it must catch, and what
CUDA allows that it must not refuse."""

from __future__ import annotations

import pytest
import torch

from megatron_revisual.convert.dist_io import launch

pytestmark = pytest.mark.integration


def _checks() -> dict[str, str]:
    import torch.distributed as dist
    from fake_cuda import DeviceLeak, fake_cuda

    seen: dict[str, str] = {}

    def outcome(name, fn):
        try:
            fn()
            seen[name] = "ok"
        except DeviceLeak as e:
            seen[name] = f"leak: {e}"

    with fake_cuda() as fake:
        emb = fake.to_cuda(torch.nn.Embedding(10, 4))
        host_ids = torch.tensor([1, 2, 3])
        device_ids = host_ids.to("cuda")
        seen["moved is a new tensor"] = str(device_ids is not host_ids)
        seen["devices"] = f"{fake.device(host_ids)} {fake.device(device_ids)} {device_ids.device} {device_ids.is_cuda}"
        outcome("embedding of host ids", lambda: emb(host_ids))
        outcome("embedding of device ids", lambda: emb(device_ids))
        outcome("host scalar times device tensor", lambda: emb.weight * torch.tensor(2.0))
        outcome("host vector plus device vector", lambda: device_ids + host_ids)
        outcome("factory on current_device",
                lambda: emb(torch.zeros(2, dtype=torch.long, device=torch.cuda.current_device())))
        outcome("copy between devices", lambda: torch.zeros(3, dtype=torch.long, device="cuda").copy_(host_ids))
        outcome("device tensor indexed by host indices", lambda: emb.weight[host_ids])
        outcome("all_reduce of a host tensor", lambda: dist.all_reduce(torch.ones(2)))
        outcome("all_reduce of a device tensor", lambda: dist.all_reduce(torch.ones(2, device="cuda")))
        outcome("a .cpu() result beside device tensors", lambda: emb.weight + emb.weight.cpu())
        seen["backend"] = dist.get_backend()
    seen["backend after"] = dist.get_backend()
    return seen


def test_fake_cuda_refuses_what_cuda_and_nccl_refuse_and_nothing_else():
    (seen,) = launch(_checks, tp=1, pp=1)
    assert seen["moved is a new tensor"] == "True"
    assert seen["devices"] == "cpu cuda cuda:0 True"
    for name in ("embedding of device ids", "host scalar times device tensor", "factory on current_device",
                 "copy between devices", "device tensor indexed by host indices", "all_reduce of a device tensor"):
        assert seen[name] == "ok", (name, seen[name])
    assert seen["embedding of host ids"] == "leak: embedding: tensors on cuda and on the host (cpu (3,), cuda (10, 4))"
    assert seen["host vector plus device vector"].startswith("leak: TensorBase.add")
    assert seen["a .cpu() result beside device tensors"].startswith("leak: TensorBase.add")
    assert seen["all_reduce of a host tensor"] == (
        "leak: torch.distributed.all_reduce on NCCL got a host tensor (2,) torch.float32; "
        "NCCL takes device tensors only")
    assert (seen["backend"], seen["backend after"]) == ("nccl", "gloo")


def test_fake_cuda_needs_the_cpu_redirects():
    from fake_cuda import fake_cuda

    from megatron_revisual.parallel import cpu_compat

    if cpu_compat._device_mode is not None:
        pytest.skip("an earlier test of this process left the redirects installed")
    with pytest.raises(RuntimeError, match="needs the CPU redirects"), fake_cuda():
        pass
