"""The model registry: a model family is one package under `models/`, and `train/`, `convert/`,
`data/` and `config/` reach it only through here.

    family = model_family(cfg.model)             # the family of a run's ModelConfig
    model = family.build(cfg, pre_process=True, post_process=True)
    rules = family.hf_rules(cfg.model, "local")  # the HF <-> Megatron mapping table
    fields = fields_from_hf("runs/hf_tiny")      # ModelConfig fields from an HF config.json

A family (`ModelFamily`) provides its builder, its HF mapping rules, its config.json reader and
writer, its presets, its position (rope) constants for packing, and its context-parallel split.
`ModelConfig.family` names it; an HF checkpoint's `model_type` finds it. Families register by
"module:attribute" and are imported on first use, so reading a config imports no model code.
A second family (e.g. Qwen3-VL) is a new package plus one line in `_BUILTIN`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ModelFamily", "fields_from_hf", "known_families", "model_family", "preset", "preset_names",
           "register_family"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """One model family. Callables take a `config.schema.ModelConfig` (`model_cfg`) or the
    whole `RunConfig` (`cfg`), and import their model code when called.

    build(cfg, *, pre_process, post_process, vp_stage=None): this rank's pipeline stage of the
        model, random init.
    hf_rules(model_cfg, layer_backend): the `convert.mapping.Rule` list, in export order.
    fields_from_hf(hf_dir): ModelConfig fields from the checkpoint's config.json.
    hf_config(model_cfg): the config.json dict of an HF checkpoint of these sizes.
    position_config(model_cfg): the constants `data.packing.pack_sequences` computes position
        ids with (an object with `packed_positions(...)`), or None for plain rope.
    position_ids(model_cfg, input_ids, image_grid_thw, attention_mask): position ids of an
        unpacked batch [B, T] (the HF-parity check's input).
    split_for_context_parallel(tensor, packed_seq_params): this CP rank's tokens of a packed row.
    segment_bounds(packed_seq_params): the packed row's sequence bounds (for CP gathers).
    presets: preset name -> a ModelConfig factory.
    hf_model_types: the config.json `model_type` values it reads."""

    name: str
    hf_model_types: tuple[str, ...]
    presets: Mapping[str, Callable[[], Any]]
    build: Callable[..., Any]
    hf_rules: Callable[[Any, str], list[Any]]
    fields_from_hf: Callable[[str | Path], dict[str, Any]]
    hf_config: Callable[[Any], dict[str, Any]]
    position_config: Callable[[Any], Any]
    position_ids: Callable[..., Any]
    split_for_context_parallel: Callable[..., Any]
    segment_bounds: Callable[..., Any]


_BUILTIN: dict[str, str] = {
    "qwen2_5_vl": "megatron_revisual.models.qwen25_vl.family:FAMILY",
}
_REGISTRY: dict[str, str | ModelFamily] = dict(_BUILTIN)


def register_family(family: ModelFamily) -> None:
    """Add a family (the built-in ones are in `_BUILTIN`, imported on first use)."""
    _REGISTRY[family.name] = family


def known_families() -> list[str]:
    return sorted(_REGISTRY)


def _load(name: str) -> ModelFamily:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"model.family={name!r} is not a registered model family; known: {known_families()}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = entry
    return entry


def model_family(model: Any) -> ModelFamily:
    """The family of a `ModelConfig` (its `family` field) or of a family name."""
    return _load(model if isinstance(model, str) else model.family)


def preset_names() -> dict[str, str]:
    """Every registered preset name -> its family."""
    return {p: name for name in known_families() for p in _load(name).presets}


def preset(name: str) -> Any:
    """The ModelConfig of preset `name` (KeyError naming the known ones)."""
    owners = preset_names()
    if name not in owners:
        raise KeyError(f"model.preset={name!r} is unknown; use one of {sorted(owners)}")
    return _load(owners[name]).presets[name]()


def fields_from_hf(hf_dir: str | Path) -> dict[str, Any]:
    """ModelConfig fields (with `family`) from an HF checkpoint's config.json, read by the family
    whose `hf_model_types` has its `model_type`."""
    path = Path(hf_dir) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json (model.hf_path must be an HF model directory)") from None
    for name in list(_REGISTRY):  # registration order
        family = _load(name)
        if model_type in family.hf_model_types:
            return {**family.fields_from_hf(hf_dir), "family": name}
    known = [t for n in list(_REGISTRY) for t in _load(n).hf_model_types]
    raise ValueError(f"{path}: model_type is {model_type!r}; expected " + " or ".join(map(repr, known)))
