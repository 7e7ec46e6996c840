"""parallel.device: what moves to the compute device, and the device each collective takes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_revisual.data.packing import Sample, pack_sequences
from megatron_revisual.parallel import device as dev

META = torch.device("meta")  # a second device that exists on every machine


@dataclasses.dataclass(frozen=True)
class _Item:
    packed: object
    extra: dict
    name: str = "row"


def test_to_device_moves_every_tensor_of_a_packed_row_and_keeps_the_rest():
    packed = pack_sequences([Sample(input_ids=torch.arange(1, 6)), Sample(input_ids=torch.arange(1, 4))],
                            config=None, pad_to_multiple_of=4)
    item = _Item(packed=packed, extra={"adv": torch.ones(1, 8), "ids": [torch.zeros(2), (torch.ones(1), 3)]})
    moved = dev.to_device(item, META)
    tensors = [moved.packed.input_ids, moved.packed.labels, moved.packed.loss_mask, moved.packed.position_ids,
               moved.packed.cu_seqlens, moved.packed.packed_seq_params.cu_seqlens_q,
               moved.packed.packed_seq_params.cu_seqlens_kv_padded, moved.extra["adv"], moved.extra["ids"][0],
               moved.extra["ids"][1][0]]
    assert all(t.device == META for t in tensors)
    assert moved.extra["ids"][1][1] == 3 and moved.name == "row"
    assert moved.packed.packed_seq_params.max_seqlen_q == packed.packed_seq_params.max_seqlen_q
    assert item.packed.input_ids.device.type == "cpu"  # the host row is left as it was


def test_compute_device_defaults_to_the_cpu_here_and_can_be_set():
    if torch.cuda.is_available():
        pytest.skip("the default is the current CUDA device on a GPU machine")
    assert dev.compute_device() == torch.device("cpu")
    dev.set_compute_device("cuda")
    try:
        assert dev.compute_device() == torch.device("cuda")
    finally:
        dev.set_compute_device(None)
    assert dev.compute_device() == torch.device("cpu")


def _reduce_on_one_rank():
    import torch.distributed as dist

    host = torch.tensor([2.0, 3.0], dtype=torch.float64)
    out = dev.all_reduce(host, op=dist.ReduceOp.MAX)
    return dev.comm_device(), out.device.type, out.tolist(), out is host


def test_all_reduce_takes_gloo_s_device_and_returns_a_new_tensor_where_the_input_was():
    from megatron_revisual.convert.dist_io import launch

    assert launch(_reduce_on_one_rank, tp=1, pp=1) == [(torch.device("cpu"), "cpu", [2.0, 3.0], False)]
