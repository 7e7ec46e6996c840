"""What every model family shares."""

from __future__ import annotations

import torch

__all__ = ["TORCH_DTYPES"]

# `ModelConfig.params_dtype` names -> torch dtypes
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
