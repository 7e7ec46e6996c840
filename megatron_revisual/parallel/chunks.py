"""A model as Megatron hands it around: one module or its virtual-pipeline chunks, each maybe
under DDP / Float16Module wrappers. One owner for unwrapping it (training, export, sync)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["inner_model", "model_chunks"]


def model_chunks(model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """A model given as one module or as its (virtual-pipeline) chunks, as a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under Megatron's DDP / Float16Module wrappers (the one holding `model_cfg`)."""
    inner = model
    while not hasattr(inner, "model_cfg") and hasattr(inner, "module"):
        inner = inner.module
    return inner
