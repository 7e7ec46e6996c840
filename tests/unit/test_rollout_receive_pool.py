"""The engine process's receive memory: reused only when nothing uses it any more."""

from __future__ import annotations

import torch

from megatron_revisual.rollout.remote import _carve, _ReceivePool


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_a_block_still_in_use_is_never_handed_out_again():
    pool = _ReceivePool()
    first = pool.take(128, 1024)
    (name, weight, raw), = _carve(first, [("w", "float32", (4, 8), 0)])
    del first, raw
    kept = weight.t()[1:]  # a view the engine made of the received tensor
    del weight
    second = pool.take(128, 1024)
    assert _ptr(second) != _ptr(kept)  # the first block is still referenced through `kept`
    del kept
    third = pool.take(64, 1024)
    assert len(pool.blocks) == 2
    assert _ptr(third) not in (_ptr(second),)
    assert _ptr(third) == _ptr(pool.blocks[0][0])  # the first block, free again


def test_a_larger_request_gets_a_larger_block_and_the_pool_is_capped():
    pool = _ReceivePool()
    held = [pool.take(10, 100) for _ in range(_ReceivePool.MAX_BLOCKS + 2)]
    assert len(pool.blocks) == _ReceivePool.MAX_BLOCKS
    big = pool.take(5000, 100)
    assert big.numel() == 5000 and len(pool.blocks) == _ReceivePool.MAX_BLOCKS
    del held


def test_carved_tensors_have_their_dtypes_shapes_and_offsets():
    region = torch.zeros(256, dtype=torch.uint8)
    out = _carve(region, [("a", "float32", (2, 3), 0), ("b", "bfloat16", (5,), 64)])
    (na, a, ra), (nb, b, rb) = out
    assert (na, a.dtype, tuple(a.shape), ra.numel()) == ("a", torch.float32, (2, 3), 24)
    assert (nb, b.dtype, tuple(b.shape), rb.numel()) == ("b", torch.bfloat16, (5,), 10)
    rb.copy_(torch.full((5,), 1.5, dtype=torch.bfloat16).view(torch.uint8))
    assert region[64:74].view(torch.bfloat16).tolist() == [1.5] * 5
