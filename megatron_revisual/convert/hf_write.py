"""Writing a Hugging Face model directory (staged with `megatron_revisual.staged_dir`).

    with staged_output_dir(out, overwrite=False) as tmp:      # .<name>.partial-XXXX beside out
        write_hf_weights(tmp, specs, tensor_stream)            # safetensors shards + index
        write_hf_side_files(tmp, model_cfg, source_dir)        # config, tokenizer, processor, ...
    # renamed to `out` only here, when everything above finished

The side files (tokenizer, processor, chat template, generation config) are copied from a
source directory: the original HF checkpoint, or the copy `hf-to-mcore` keeps inside the
Megatron checkpoint. config.json is copied too after checking it describes `model_cfg`, or
written from the model family's `hf_config` when there is none.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.convert.rows import FileCopier
from megatron_revisual.convert.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    ConvertError,
    StreamingSafetensorsWriter,
    TensorSpec,
)

# Files that hold weights (ours or another format's): never copied as "side files".
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_FILES = {INDEX_FILE, "pytorch_model.bin.index.json"}
# Architecture fields compared between a config.json and the model being written.
_IGNORED_FIELDS = {"name", "hf_path", "params_dtype", "layer_backend"}


def side_files(src_dir: str | Path) -> list[Path]:
    """The non-weight files of an HF directory: config, tokenizer, processor, templates, docs."""
    src = Path(src_dir)
    return sorted(
        p
        for p in src.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in _WEIGHT_FILES
        and not p.name.endswith(_WEIGHT_SUFFIXES)
    )


def copy_side_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in side_files(src_dir):
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


def config_mismatches(model_cfg: ModelConfig, hf_dir: str | Path) -> list[str]:
    """Fields where `hf_dir`/config.json disagrees with `model_cfg`, as 'field: a != b' lines."""
    from megatron_revisual.models.registry import fields_from_hf

    try:
        fields = fields_from_hf(hf_dir)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ConvertError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    out = []
    for key, value in fields.items():
        if key in _IGNORED_FIELDS:
            continue
        ours = getattr(model_cfg, key)
        if key == "kv_channels":  # None means hidden // heads: compare what it resolves to
            ours, value = (
                model_cfg.head_dim,
                value or fields["hidden_size"] // fields["num_attention_heads"],
            )
        if ours != value:
            out.append(f"{key}: {value!r} in config.json, {ours!r} in the checkpoint")
    return out


def write_hf_side_files(
    out_dir: Path, model_cfg: ModelConfig, source_dir: str | Path | None
) -> None:
    """config.json, generation_config.json and the tokenizer / processor / chat template files."""
    out = Path(out_dir)
    if source_dir is not None:
        source = Path(source_dir)
        if (source / "config.json").exists():
            bad = config_mismatches(model_cfg, source)
            if bad:
                raise ConvertError(
                    f"{source / 'config.json'} does not describe the checkpoint's model:\n  "
                    + "\n  ".join(bad)
                )
        copy_side_files(source, out)
        _set_config_dtype(out / "config.json", model_cfg.params_dtype)
    if not (out / "config.json").exists():
        from megatron_revisual.models.registry import model_family

        (out / "config.json").write_text(
            json.dumps(model_family(model_cfg).hf_config(model_cfg), indent=2, sort_keys=True) + "\n"
        )
    if not (out / "generation_config.json").exists():
        config = json.loads((out / "config.json").read_text())
        text = config.get("text_config", config)
        ids = {
            k: text.get(k, config.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        }
        gen = {k: v for k, v in ids.items() if v is not None}
        (out / "generation_config.json").write_text(
            json.dumps(gen, indent=2, sort_keys=True) + "\n"
        )


_HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _set_config_dtype(path: Path, params_dtype: str) -> None:
    """Make a copied config.json's dtype say what the weights are (a bf16-trained checkpoint
    exported with an fp32 source's config); left byte-identical when it already does."""
    if not path.exists():
        return
    config = json.loads(path.read_text())
    want, changed = _HF_DTYPES[params_dtype], False
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in section and section[key] != want:
                section[key], changed = want, True
    if changed:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_hf_weights(
    out_dir: Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor | list[tuple[str | None, int, int]]]],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Stream `tensors` (in `specs` order) into safetensors shards + index; returns the files.
    An item may give, instead of a tensor, the byte ranges to copy it from (`convert.rows`)."""
    writer = StreamingSafetensorsWriter(out_dir, specs, max_shard_bytes=max_shard_bytes)
    try:
        with FileCopier() as copier:
            for name, tensor in tensors:
                if isinstance(tensor, torch.Tensor):
                    writer.write(name, tensor)
                else:
                    writer.copy(name, tensor, copier)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.files
