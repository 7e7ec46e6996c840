"""Layout checks, the CPU redirects and the SP-capable norm, in this process (no ranks spawned)."""

from __future__ import annotations

import pytest
import torch

from megatron_revisual.parallel import (
    ParallelLayout,
    cpu_compat,
    initialize_parallel,
    install_cpu_compat,
    run_distributed,
)

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the redirects are CPU-only")


def test_data_parallel_fills_the_remaining_ranks() -> None:
    layout = ParallelLayout.for_world(16, tp=2, pp=2, cp=2)
    assert (layout.tp, layout.pp, layout.cp, layout.dp, layout.world_size) == (2, 2, 2, 2, 16)


def test_world_size_not_divisible_names_the_numbers() -> None:
    with pytest.raises(
        ValueError, match=r"world_size=6 is not divisible by tp\*pp\*cp = 2\*2\*1 = 4"
    ):
        ParallelLayout.for_world(6, tp=2, pp=2)


@pytest.mark.parametrize("field", ["tp", "pp", "cp"])
def test_sizes_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=rf"{field}=0 must be a positive integer"):
        ParallelLayout.for_world(4, **{field: 0})


def test_inconsistent_layout_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"tp\*pp\*cp\*dp = 2\*1\*1\*1 = 2 != world_size=4"):
        ParallelLayout(tp=2, world_size=4)


def test_virtual_pipeline_needs_pipeline_parallelism() -> None:
    with pytest.raises(ValueError, match=r"vpp=2 needs pipeline parallelism; got pp=1"):
        ParallelLayout.for_world(2, tp=2, vpp=2)
    assert ParallelLayout.for_world(4, pp=4, vpp=2).vpp == 2


def test_initialize_parallel_checks_the_layout_before_starting_anything(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"world_size=6 is not divisible by tp\*pp\*cp = 4\*1\*1"):
        initialize_parallel(tp=4)
    assert not torch.distributed.is_initialized()


def test_run_distributed_checks_the_layout_before_spawning() -> None:
    with pytest.raises(
        ValueError, match=r"world_size=3 is not divisible by tp\*pp\*cp = 1\*2\*1 = 2"
    ):
        run_distributed(print, world_size=3, pp=2)


@pytest.fixture
def compat_undone_afterwards():
    """Run the test from a process without the redirects and leave the process as it was:
    earlier tests in the same pytest process (in-process ranks) may have installed them."""
    already_installed = cpu_compat._device_mode is not None
    if already_installed:
        cpu_compat.uninstall_cpu_compat()
    yield
    if cpu_compat._device_mode is not None:
        cpu_compat.uninstall_cpu_compat()
    if already_installed:
        install_cpu_compat()


def test_install_is_a_no_op_with_a_gpu(monkeypatch, compat_undone_afterwards) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = (
        torch.cuda.current_device,
        torch.Tensor.cuda,
        torch.Tensor.type,
        torch.cuda.manual_seed,
    )
    modes = torch._C._len_torch_function_stack()
    install_cpu_compat()
    after = (
        torch.cuda.current_device,
        torch.Tensor.cuda,
        torch.Tensor.type,
        torch.cuda.manual_seed,
    )
    assert after == before
    assert torch._C._len_torch_function_stack() == modes


@needs_no_gpu
def test_install_twice_is_safe_and_redirects_to_cpu(compat_undone_afterwards) -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    original_current_device = torch.cuda.current_device
    install_cpu_compat()
    redirected = list(cpu_compat._originals)
    modes = torch._C._len_torch_function_stack()
    install_cpu_compat()
    assert cpu_compat._originals == redirected
    assert torch._C._len_torch_function_stack() == modes

    cpu = torch.device("cpu")
    assert torch.cuda.current_device() == cpu
    assert torch.zeros(2, device="cuda").device == cpu
    assert torch.ones(2).to("cuda").device == cpu
    assert torch.ones(2).to(0, torch.float64).dtype == torch.float64
    x = torch.ones(2)
    assert x.cuda() is x
    torch.cuda.synchronize()
    assert isinstance(torch.cuda.current_stream(), torch.cpu.Stream)
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.type(torch.float64).dtype == torch.float64

    torch.manual_seed(3)  # also calls torch.cuda.manual_seed_all: must not recurse
    assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
    torch.cuda.manual_seed(5)
    state = mcore_random._get_cuda_rng_state()
    first = torch.rand(3)
    mcore_random._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), first)

    cpu_compat.uninstall_cpu_compat()
    assert torch.cuda.current_device is original_current_device
    assert torch.ones(2).type() == "torch.FloatTensor"


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm")
    return TransformerConfig(**(fields | overrides))


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_rmsnorm_flags_its_weight_for_sequence_parallel(sequence_parallel: bool) -> None:
    from megatron_revisual.parallel.norm import RMSNorm

    config = _config(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    norm = RMSNorm(config=config, hidden_size=8, eps=1e-6)
    assert norm.weight.sequence_parallel is sequence_parallel
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    reference = torch.nn.RMSNorm(8, eps=1e-6)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(norm(x), reference(x), rtol=0, atol=1e-6)


def test_rmsnorm_refuses_a_layernorm_config() -> None:
    from megatron_revisual.parallel.norm import RMSNorm

    with pytest.raises(ValueError, match="normalization='LayerNorm'"):
        RMSNorm(config=_config(normalization="LayerNorm"), hidden_size=8)


def test_local_layer_spec_uses_our_norm_in_every_slot() -> None:
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_revisual.parallel.norm import RMSNorm
    from megatron_revisual.parallel.specs import local_gpt_layer_spec

    spec = local_gpt_layer_spec(qk_layernorm=True).submodules
    attention = spec.self_attention.submodules
    assert spec.input_layernorm is spec.pre_mlp_layernorm is RMSNorm
    assert attention.q_layernorm is attention.k_layernorm is RMSNorm
    assert local_gpt_layer_spec().submodules.self_attention.submodules.q_layernorm is IdentityOp


@needs_no_gpu
def test_a_one_rank_launch_leaves_no_redirect_behind(compat_undone_afterwards) -> None:
    """convert.dist_io.launch runs one rank in the caller's process: the CPU redirects it needs
    leave with it (they used to stay, turning every later 'cuda' tensor of the process into a
    CPU one)."""
    from megatron_revisual.convert.dist_io import launch

    original = torch.cuda.current_device
    modes = torch._C._len_torch_function_stack()
    inside = launch(lambda: (torch.cuda.current_device(), torch.zeros(1, device="cuda").device.type), tp=1, pp=1)
    assert inside == [(torch.device("cpu"), "cpu")]  # redirected while the rank ran
    assert torch.cuda.current_device is original
    assert torch._C._len_torch_function_stack() == modes
    assert cpu_compat._device_mode is None
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
