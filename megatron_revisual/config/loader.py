"""YAML files and dotted overrides -> a validated `RunConfig`.

    cfg = load_config("configs/tiny_cpu_demo.yaml", ["optim.lr=1e-6", "parallel.sequence_parallel=true"])

A file is a nested mapping mirroring the dataclasses. `model.preset: qwen25_vl_7b` starts the
model from a named size and `model.hf_path: DIR` from an HF config.json; keys given beside them
override. Overrides are `dotted.path=value`, with the value parsed as YAML and then converted to
the field's declared type. Every error names the dotted field, the value and what is legal.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_revisual.config.schema import ModelConfig, RunConfig
from megatron_revisual.config.validate import validate_config


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which field and why."""


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read `path` (YAML), apply `overrides`, build and validate the config."""
    raw = read_raw_config(path, overrides)
    source = str(path) if path is not None else "<no file>"
    if overrides:
        source += " + overrides"
    cfg = config_from_dict(raw, source=source)
    validate_config(cfg)
    return cfg


def read_raw_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The nested dict of `path` with `overrides` applied, before any typing or checks."""
    raw: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return _interpolate(raw, raw)


_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(node: Any, top: dict[str, Any]) -> Any:
    """`${output_dir}` (any top-level scalar key) inside strings becomes that key's value, so
    a recipe can keep its data and model beside its outputs and one override moves them all."""
    if isinstance(node, dict):
        return {k: _interpolate(v, top) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, top) for v in node]
    if not isinstance(node, str) or "${" not in node:
        return node

    def value(m: re.Match[str]) -> str:
        key = m.group(1)
        v = top.get(key)
        if v is None or isinstance(v, dict | list) or (isinstance(v, str) and "${" in v):
            raise ConfigError(f"${{{key}}} in {node!r}: no top-level scalar '{key}' to substitute")
        return str(v)

    return _REFERENCE.sub(value, node)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; `base: other.yaml` (relative to this file) is read first and this file's
    keys merged onto it, sections recursively (a recipe states only what differs)."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    raw = loaded or {}
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"{path}: base {base} includes itself")
    return _merge(_read_yaml(base_path, (*seen, path.resolve())), raw)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in the nested dict `raw` (creating levels as needed)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. optim.lr=1e-6)")
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:  # e.g. `vision: null` in the file, now being given fields
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"override {item!r}: {where} is a value ({child!r}), not a section")
        node = child
    node[leaf] = yaml.safe_load(value) if value.strip() else ""


def config_from_dict(raw: dict[str, Any], *, source: str = "<dict>") -> RunConfig:
    raw = dict(raw)
    model = raw.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: 'model' section is required (a preset, an hf_path or explicit sizes)")
    raw["model"] = _resolve_model_section(model, source)
    return _build(RunConfig, raw, "", source)


def _resolve_model_section(model: dict[str, Any], source: str) -> dict[str, Any]:
    """Expand `preset` / `hf_path` into explicit fields; explicit keys win."""
    from megatron_revisual.models.registry import fields_from_hf
    from megatron_revisual.models.registry import preset as preset_config

    model = dict(model)
    base: dict[str, Any] = {}
    preset = model.pop("preset", None)
    if preset is not None:
        try:
            base = _asdict_shallow(preset_config(preset))
        except KeyError as e:  # "model.preset='x' is unknown; use one of [...]"
            raise ConfigError(f"{source}: {e.args[0]}") from None
    elif model.get("hf_path") and not _has_required_fields(model):
        try:
            base = fields_from_hf(model["hf_path"])
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise ConfigError(f"{source}: model.hf_path: {e}") from None
    vision_override = model.pop("vision", dataclasses.MISSING)
    merged = {**base, **model}
    if vision_override is not dataclasses.MISSING:
        if isinstance(vision_override, dict) and base.get("vision") is not None:
            merged["vision"] = {**_asdict_shallow(base["vision"]), **vision_override}
        else:
            merged["vision"] = vision_override
    return merged


def _has_required_fields(model: dict[str, Any]) -> bool:
    """Every size is given (e.g. a dumped config): hf_path then only says where the weights are."""
    required = [f.name for f in dataclasses.fields(ModelConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    return all(name in model for name in required)


def _asdict_shallow(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if dataclasses.is_dataclass(raw) and isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise ConfigError(
            f"{source}: unknown field '{prefix}{name}'{hint} (fields of {prefix.rstrip('.') or 'the config'}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], f"{prefix}{name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: required field '{prefix}{name}' is missing")
    return cls(**kwargs)


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Convert a YAML value to the declared type `tp`, or raise naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {where}={value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {where}={value!r} is not allowed; use one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping, got {value!r}")
        return {
            _convert(k, args[0], f"{where}", source): _convert(v, args[1], f"{where}.{k}", source)
            for k, v in value.items()
        }
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {where} must be a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{where}.", source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {where}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {where}={value!r} must be an integer")
    if tp is float:
        # YAML 1.1 reads `1e-6` (no dot) as a string: accept any float-looking text.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {where}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {where}={value!r} must be a string")
    raise TypeError(f"config field {where} has unsupported type {tp}")  # a bug in schema.py


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The plain nested dict of a config (for YAML dumps, logs and checkpoints)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


__all__ = [
    "ConfigError",
    "ModelConfig",
    "apply_override",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "read_raw_config",
]
