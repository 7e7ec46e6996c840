"""Which engine class serves which engine config: the one place a rollout backend is named.

    from megatron_revisual.rollout.registry import create_engine
    engine = create_engine(VLLMEngineConfig(model_path="runs/tiny", dtype="float32"))

An entry maps a config class (a subclass of `engine.EngineConfig`) to the engine class that
takes it, named as "module:attribute" and imported only when that engine starts, so the base
interface (`rollout.engine`) imports no backend and choosing the transformers engine never
imports vLLM. A new backend (e.g. SGLang) is a module with its config and engine classes plus
one `register_engine` call (or one line in `_BUILTIN`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from megatron_revisual.parallel.rng import rng_preserved
from megatron_revisual.rollout.engine import (
    EngineConfig,
    HFEngineConfig,
    RolloutEngine,
    VLLMEngineConfig,
)

__all__ = ["create_engine", "engine_class", "register_engine"]

_BUILTIN: dict[type[EngineConfig], str] = {
    VLLMEngineConfig: "megatron_revisual.rollout.vllm_engine:VLLMEngine",
    HFEngineConfig: "megatron_revisual.rollout.hf_engine:HFEngine",
}
_REGISTRY: dict[type[EngineConfig], str | Callable[[Any], RolloutEngine]] = dict(_BUILTIN)


def register_engine(config_type: type[EngineConfig], engine: str | Callable[[Any], RolloutEngine]) -> None:
    """Serve `config_type` with `engine` (a class or factory taking the config, or its
    "module:attribute" name, imported at the first start)."""
    if not (isinstance(config_type, type) and issubclass(config_type, EngineConfig)):
        raise TypeError(f"register_engine: {config_type!r} is not an EngineConfig subclass")
    _REGISTRY[config_type] = engine


def engine_class(config: EngineConfig) -> Callable[[Any], RolloutEngine]:
    """The engine class (or factory) registered for `config`'s type (the nearest registered
    base class of it)."""
    for cls in type(config).__mro__:
        entry = _REGISTRY.get(cls)
        if entry is None:
            continue
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            return getattr(importlib.import_module(module), attr)
        return entry
    known = ", ".join(sorted(c.__name__ for c in _REGISTRY))
    raise TypeError(f"no engine for config type {type(config).__name__}; registered: {known}")


def create_engine(config: EngineConfig) -> RolloutEngine:
    """The engine of `config`, started in this process. The process's random generators are as
    they were before (`parallel.rng.rng_preserved`): vLLM's worker reseeds them all at start,
    which would otherwise undo a resumed trainer's restored RNG."""
    factory = engine_class(config)
    with rng_preserved():
        return factory(config)
