"""RMSNorm for Megatron-Core local (non-Transformer-Engine) layer specs, sequence-parallel ready.

Megatron-Core's local spec uses `WrappedTorchNorm`, which refuses `sequence_parallel`. Under
sequence parallelism each tensor-parallel rank normalizes only its slice of the sequence, so
each rank's weight gradient is a partial sum; Megatron's `finalize_model_grads` all-reduces
exactly the parameters flagged `sequence_parallel = True`, which this norm sets.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """Root-mean-square norm with Megatron's norm constructor signature (config, hidden_size, eps).

    Computed as Hugging Face's Qwen2 RMSNorm: normalize in fp32, cast back to the input dtype,
    then scale, so converted checkpoints reproduce HF activations.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"RMSNorm built with config.normalization={config.normalization!r}; "
                "set normalization='RMSNorm' or use a LayerNorm spec"
            )
        if config.layernorm_zero_centered_gamma:
            raise ValueError("RMSNorm does not implement layernorm_zero_centered_gamma=True")
        device = (
            torch.cuda.current_device()
            if torch.cuda.is_available() and not config.use_cpu_initialization
            else "cpu"
        )
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        # Read by finalize_model_grads to all-reduce this weight's grad over the TP group.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
