"""Hugging Face <-> Megatron-Core distributed checkpoints (dist_checkpointing, torch_dist), streamed.

    convert_hf_to_mcore("hf/Qwen2.5-VL-7B", "ckpt/7b", tp=2, pp=2)   # any TP/PP loads it later
    convert_mcore_to_hf("ckpt/7b", "hf/7b-out")                     # or a training checkpoint
    load_model_checkpoint(model, "ckpt/7b")                         # a built (sharded) model

hf-to-mcore never materialises the model. At TP = PP = 1 (`convert.direct`) one process writes
the files itself: the layout from `convert.tp1_layout`, each chunk's bytes copied from the HF
files by the kernel where the mapping only moves rows. At larger TP / PP each rank builds its
pipeline stage on the meta device to get Megatron's `sharded_state_dict` (keys, global shapes,
offsets, the SwiGLU factory), and hands it to torch.distributed.checkpoint with a planner whose
`resolve_data` computes a tensor only when the writer asks for it (`convert.lazy_save`): read
the HF tensor(s), map them with `convert.mapping` into this rank's shard, write, drop. Either
way the checkpoint is Megatron's own format (metadata.json, .metadata, __rank_i.distcp), so
`dist_checkpointing.load` reshards it on load.

mcore-to-hf (`convert.direct`, one process) reads one parameter at a time straight from the
.distcp files, where `convert.tp1_layout` says it lies (stated from the rule table and tested
equal to Megatron's sharded_state_dict of a TP = PP = 1 model): the rows the mapping moves are
copied file to file into the safetensors shards, anything else is read (the stored chunks
narrowed to the parameter's region, from any saved layout), mapped back with `to_hf` and
streamed.

Beside Megatron's files the checkpoint holds `revisual_model.json` (our ModelConfig and where it
came from) and `hf_files/` (config, tokenizer, processor and template files of the source), so
mcore-to-hf can rebuild a complete HF directory without --hf-config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch

from megatron_revisual.config.schema import (
    ClusterConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from megatron_revisual.convert.direct import hf_shape_errors, hf_to_mcore_tp1, mcore_to_hf_tp1
from megatron_revisual.convert.dist_io import DistCheckpointReader, agree_on_errors, launch
from megatron_revisual.convert.export import export_rules, is_tied_output_copy
from megatron_revisual.convert.hf_load import global_param_names, mapping_context
from megatron_revisual.convert.hf_write import (
    config_mismatches,
    copy_side_files,
    write_hf_side_files,
)
from megatron_revisual.convert.mapping import Rule, to_megatron
from megatron_revisual.convert.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    ConvertError,
    HFCheckpoint,
)
from megatron_revisual.staged_dir import check_output_target, staged_output_dir

MODEL_META_FILE = "revisual_model.json"
HF_FILES_DIR = "hf_files"
_DTYPE_FIELDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------- config & metadata


# The convert commands' names for the layout options that validation errors name.
_CLI_OPTIONS = {
    "parallel.tensor_model_parallel_size": "--tp",
    "parallel.pipeline_model_parallel_size": "--pp",
    "parallel.num_layers_in_first_pipeline_stage": "--first-stage-layers",
}


def run_config_for(model_cfg: ModelConfig, tp: int, pp: int, first_stage_layers: int | None = None) -> RunConfig:
    """A validated RunConfig that builds `model_cfg` at (tp, pp) on the local layer spec. When
    `pp` does not divide the layers and `first_stage_layers` is None, the first stage (which also
    holds the vision tower) gets `default_first_stage_layers`. Errors name the convert
    commands' options."""
    from megatron_revisual.config.validate import ConfigValidationError, validate_config

    if first_stage_layers is None and pp > 1 and model_cfg.num_layers % pp:
        first_stage_layers = default_first_stage_layers(model_cfg.num_layers, pp)
    cfg = RunConfig(
        model=dataclasses.replace(model_cfg, layer_backend="local", hf_path=None),
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            num_layers_in_first_pipeline_stage=first_stage_layers,
            use_distributed_optimizer=False,
        ),
        cluster=ClusterConfig(devices_per_node=tp * pp, backend="gloo"),
        train=TrainConfig(seq_length=4096, micro_batch_size=1, global_batch_size=1),
    )
    try:
        validate_config(cfg)
    except ConfigValidationError as e:
        message = str(e)
        for option, flag in _CLI_OPTIONS.items():
            message = message.replace(option, flag)
        where = f"TP={tp}, PP={pp}" + (
            f", {first_stage_layers} layers on the first stage" if first_stage_layers else "")
        raise ConvertError(f"cannot lay the model out at {where}: {message}") from None
    return cfg


def default_first_stage_layers(num_layers: int, pp: int) -> int | None:
    """For `pp` stages that do not divide `num_layers`: the first stage's layer count that makes
    the largest stage smallest, the rest splitting evenly (ties: the smaller first stage, which
    also holds the vision tower); None when no split exists (pp > num_layers)."""
    if pp < 2:
        return None
    splits = [f for f in range(1, num_layers - pp + 2) if (num_layers - f) % (pp - 1) == 0]
    if not splits:
        return None
    return min(splits, key=lambda f: (max(f, (num_layers - f) // (pp - 1)), f))


def model_config_from_hf(hf_dir: str | Path, params_dtype: str) -> ModelConfig:
    from megatron_revisual.config import ConfigError, config_from_dict
    from megatron_revisual.models.registry import fields_from_hf

    try:
        fields = fields_from_hf(hf_dir)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConvertError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    fields.update(hf_path=None, params_dtype=params_dtype, name=Path(hf_dir).name or "hf")
    try:
        return config_from_dict({"model": fields}).model
    except ConfigError as e:
        raise ConvertError(f"{Path(hf_dir) / 'config.json'}: {e}") from None


def write_checkpoint_metadata(
    ckpt_dir: str | Path,
    model_cfg: ModelConfig,
    *,
    hf_dir: str | Path | None = None,
    layout: dict | None = None,
) -> None:
    """Store the ModelConfig (and the source's HF side files) inside a Megatron checkpoint, so
    mcore-to-hf and verify know the architecture. The training runner calls this when it saves."""
    ckpt = Path(ckpt_dir)
    meta = {
        "format_version": 1,
        "model": dataclasses.asdict(dataclasses.replace(model_cfg, hf_path=None)),
        "source_hf_dir": str(Path(hf_dir).resolve()) if hf_dir is not None else None,
        "saved_layout": layout or {},
        "hf_files": None,
    }
    if hf_dir is not None:
        meta["hf_files"] = copy_side_files(hf_dir, ckpt / HF_FILES_DIR)
    (ckpt / MODEL_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A dist checkpoint directory itself, or a training save dir with latest_checkpointed_iteration.txt."""
    ckpt = Path(path)
    if (ckpt / "metadata.json").exists():
        return ckpt
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    if tracker.exists():
        it = tracker.read_text().strip()
        sub = ckpt / (f"iter_{int(it):07d}" if it.isdigit() else it)
        if (sub / "metadata.json").exists():
            return sub
        raise ConvertError(
            f"{tracker} points at {sub}, which is not a distributed checkpoint (no metadata.json)"
        )
    if not ckpt.is_dir():
        raise ConvertError(f"{ckpt}: no such checkpoint directory")
    raise ConvertError(
        f"{ckpt}: not a Megatron distributed checkpoint (no metadata.json or latest_checkpointed_iteration.txt)"
    )


def read_checkpoint_metadata(ckpt_dir: Path) -> tuple[ModelConfig | None, Path | None]:
    """(ModelConfig, HF side-file dir) stored by hf-to-mcore / the runner, looked up in the
    checkpoint dir and its parent (a training save dir); (None, None) when absent."""
    from megatron_revisual.config import ConfigError, config_from_dict

    for d in (ckpt_dir, ckpt_dir.parent):
        path = d / MODEL_META_FILE
        if path.exists():
            meta = json.loads(path.read_text())
            try:
                model_cfg = config_from_dict({"model": meta["model"]}).model
            except (ConfigError, KeyError) as e:
                raise ConvertError(f"{path}: cannot read the model config: {e}") from None
            files = d / HF_FILES_DIR
            return model_cfg, files if files.is_dir() else None
    return None, None


def checkpoint_model_config(
    ckpt_dir: Path, hf_config_dir: str | Path | None
) -> tuple[ModelConfig, Path | None]:
    """The checkpoint's ModelConfig and HF side-file source, cross-checked with --hf-config."""
    stored, files = read_checkpoint_metadata(ckpt_dir)
    if hf_config_dir is not None:
        if stored is not None:
            bad = config_mismatches(stored, hf_config_dir)
            if bad:
                raise ConvertError(
                    f"{Path(hf_config_dir) / 'config.json'} does not match the checkpoint {ckpt_dir} "
                    f"({MODEL_META_FILE}):\n  " + "\n  ".join(bad)
                )
            return stored, Path(hf_config_dir)
        dtype = _checkpoint_dtype(ckpt_dir)
        return model_config_from_hf(hf_config_dir, _DTYPE_FIELDS.get(dtype, "bf16")), Path(
            hf_config_dir
        )
    if stored is None:
        raise ConvertError(
            f"{ckpt_dir}: no {MODEL_META_FILE}; pass --hf-config DIR with the model's config.json"
        )
    return stored, files


def _checkpoint_dtype(ckpt_dir: Path) -> torch.dtype:
    reader = DistCheckpointReader(ckpt_dir)
    for key, md in reader.tensors.items():
        if key.startswith("language_model.embedding"):
            return md.properties.dtype
    raise ConvertError(f"{ckpt_dir}: no language_model.embedding tensor in the checkpoint")


def build_meta_stage(cfg: RunConfig) -> torch.nn.Module:
    from megatron.core import parallel_state as ps

    from megatron_revisual.models.registry import model_family

    with torch.device("meta"):
        return model_family(cfg.model).build(
            cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
        )


# --------------------------------------------------------------------------- hf-to-mcore


def _rules_by_name(model_cfg: ModelConfig) -> dict[str, Rule]:
    return {r.megatron: r for r in export_rules(model_cfg)}


def _rule_for(name: str, rules: dict[str, Rule], model_cfg: ModelConfig) -> Rule:
    if is_tied_output_copy(name, model_cfg):
        return rules["language_model.embedding.word_embeddings.weight"]
    return rules[name]


class _HFShards:
    """This rank's Megatron shard of each parameter, computed from the HF checkpoint on demand."""

    def __init__(self, model: torch.nn.Module, model_cfg: ModelConfig, hf_dir: str) -> None:
        from megatron.core import parallel_state as ps

        self.reader = HFCheckpoint(hf_dir)
        self.model_cfg = model_cfg
        self.tp_rank, self.tp = (
            ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_world_size(),
        )
        self.ctx = mapping_context(model_cfg, self.tp)
        rules = _rules_by_name(model_cfg)
        self.params = dict(model.named_parameters())
        self.rules = {
            local: _rule_for(g, rules, model_cfg) for local, g in global_param_names(model).items()
        }

    def check(self) -> list[str]:
        wanted = [(rule, tuple(self.params[local].shape)) for local, rule in self.rules.items()]
        return hf_shape_errors(self.reader, wanted, self.ctx, self.model_cfg)

    def shard(self, local: str) -> torch.Tensor:
        rule, param = self.rules[local], self.params[local]
        shard = to_megatron(rule, [self.reader.get(n) for n in rule.hf], self.ctx, self.tp_rank)
        if shard.shape != param.shape:  # check() makes this unreachable; kept as the last guard
            raise ConvertError(
                f"{', '.join(rule.hf)} -> {local}: shape {tuple(shard.shape)}, expected {tuple(param.shape)}"
            )
        return shard.to(param.dtype)


def _hf_to_mcore_rank(jobs: list[tuple[ModelConfig, str, str]], first_stage_layers: int | None = None) -> int:
    """Collective: write each (model config, HF dir, checkpoint dir) job; bytes written here."""
    from megatron.core import parallel_state as ps

    from megatron_revisual.convert.lazy_save import save_sharded_lazily

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    written = 0
    for model_cfg, hf_dir, ckpt_dir in jobs:
        model = build_meta_stage(run_config_for(model_cfg, tp, pp, first_stage_layers))
        shards = _HFShards(model, model_cfg, hf_dir)
        agree_on_errors(shards.check())
        nbytes = {name: p.numel() * p.element_size() for name, p in shards.params.items()}
        written += save_sharded_lazily(model.sharded_state_dict(), ckpt_dir, shards.shard, nbytes)
    return written


def convert_hf_to_mcore(
    hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1, overwrite: bool = False,
    first_stage_layers: int | None = None,
) -> Path:
    """Write `hf_dir` as a Megatron-Core torch_dist checkpoint saved from (tp, pp) ranks (the
    first stage holding `first_stage_layers` layers; default: even, or `default_first_stage_layers`)."""
    return convert_many_hf_to_mcore([(hf_dir, out_dir)], tp=tp, pp=pp, overwrite=overwrite,
                                     first_stage_layers=first_stage_layers)[0]


def convert_many_hf_to_mcore(
    jobs: list[tuple[str | Path, str | Path]], *, tp: int = 1, pp: int = 1, overwrite: bool = False,
    first_stage_layers: int | None = None,
) -> list[Path]:
    """Several hf-to-mcore conversions on one set of rank processes (for small models, starting
    the processes costs more than converting). Every input is checked before anything is written."""
    prepared = []
    for hf_dir, out_dir in jobs:
        out = Path(out_dir).expanduser().resolve()
        check_output_target(out, overwrite)
        hf = Path(hf_dir).resolve()
        reader = HFCheckpoint(hf)
        dtypes = {reader.info(n).dtype for n in reader.names()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPE_FIELDS:
            raise ConvertError(
                f"{reader.source}: tensors have dtypes {sorted(map(str, dtypes))}; expected one of fp32/bf16/fp16"
            )
        model_cfg = model_config_from_hf(hf, _DTYPE_FIELDS[dtypes.pop()])
        run_config_for(model_cfg, tp, pp, first_stage_layers)  # layout errors before any process starts
        _check_hf_names(reader, model_cfg)
        prepared.append((model_cfg, hf, out))
    with contextlib.ExitStack() as stack:
        stagings = [
            stack.enter_context(staged_output_dir(out, overwrite=overwrite))
            for _, _, out in prepared
        ]
        jobs_here = [(cfg, str(hf), str(st)) for (cfg, hf, _), st in zip(prepared, stagings, strict=True)]
        if tp * pp == 1:  # one writer: no process group, no megatron.core (convert.direct)
            for cfg, hf, staging in jobs_here:
                hf_to_mcore_tp1(cfg, HFCheckpoint(hf), staging)
        else:
            launch(_hf_to_mcore_rank, tp=tp, pp=pp, args=(jobs_here, first_stage_layers))
        for (cfg, hf, _), staging in zip(prepared, stagings, strict=True):
            layout = {"tp": tp, "pp": pp}
            if first_stage_layers is not None:
                layout["first_stage_layers"] = first_stage_layers
            write_checkpoint_metadata(staging, cfg, hf_dir=hf, layout=layout)
    return [out for _, _, out in prepared]


def _check_hf_names(reader: HFCheckpoint, model_cfg: ModelConfig) -> None:
    wanted = [n for r in export_rules(model_cfg) for n in r.hf]
    missing = [n for n in wanted if n not in reader.weight_map]
    if missing:
        raise ConvertError(
            f"{reader.source}: {len(missing)} tensors the config ({reader.dir / 'config.json'}) needs are missing, "
            f"first {missing[0]!r}"
        )
    extra = set(reader.names()) - set(wanted)
    if model_cfg.tie_word_embeddings:
        extra.discard(
            "lm_head.weight"
        )  # a tied copy some exporters keep; the embedding is the source
    if extra:
        raise ConvertError(
            f"{reader.source}: {len(extra)} tensors have no place in the model described by "
            f"{reader.dir / 'config.json'}, e.g. {sorted(extra)[0]!r}"
        )


# --------------------------------------------------------------------------- mcore-to-hf


def convert_mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    hf_config_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the Megatron checkpoint `ckpt_dir` as a Hugging Face directory, one tensor at a time."""
    check_output_target(Path(out_dir).expanduser().resolve(), overwrite)
    ckpt = resolve_checkpoint_dir(ckpt_dir)
    model_cfg, side_dir = checkpoint_model_config(ckpt, hf_config_dir)
    if side_dir is None:
        raise ConvertError(
            f"{ckpt}: no tokenizer / processor files stored; pass --hf-config DIR (an HF directory of this model)"
        )
    source = f"the config of {hf_config_dir or (ckpt / MODEL_META_FILE)}"
    with staged_output_dir(out_dir, overwrite=overwrite) as staging:
        mcore_to_hf_tp1(model_cfg, ckpt, staging, source, max_shard_bytes)
        write_hf_side_files(staging, model_cfg, side_dir)
    return Path(out_dir).expanduser().resolve()


# --------------------------------------------------------------------------- loading into a model


def load_model_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load a dist checkpoint (any saved layout) into this rank's built model, resharding as
    needed; vocabulary padding may differ. Collective over the model-parallel world."""
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint_dir(ckpt_dir)
    DistCheckpointReader(ckpt)  # a missing or cut .distcp file: a ConvertError naming it
    sharded = model.sharded_state_dict()
    state = dist_checkpointing.load(sharded, str(ckpt))
    # a training checkpoint's common part also holds the optimizer's groups and the LR schedule
    model.load_state_dict({k: v for k, v in state.items() if k in sharded}, strict=True)
