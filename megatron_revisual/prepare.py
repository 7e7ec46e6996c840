"""The inputs a recipe's `prepare:` section writes before training (the tiny CPU demo): a tiny
random model at `model.hf_path` and the synthetic datasets in `prepare.synthetic_data`.

    write_prepared_inputs(raw)                 # `revisual train` (after taking the run lock), `revisual data`
    cfg = load_config_as_prepared(path, overrides)   # `revisual config` / `plan`, the launchers: nothing written

`load_config_as_prepared` reads the model sizes from the config the tiny model will have
(written to a temporary directory) when it is not there yet, so `revisual config
configs/tiny_cpu_demo.yaml` works on a fresh clone; the config it returns names the real
`model.hf_path`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["load_config_as_prepared", "prepared_data_dir", "write_prepared_inputs"]


def _note(message: str) -> None:
    from megatron_revisual.logfiles import console

    print(message, file=console())


def write_prepared_inputs(raw: dict[str, Any], say: Callable[[str], None] = _note) -> None:
    """Write what `prepare` asks for and is missing: the tiny model, the synthetic datasets."""
    from megatron_revisual.staged_dir import staged_output_dir

    prep = raw.get("prepare") or {}
    model = raw.get("model") or {}
    if prep.get("tiny_model"):
        hf = model.get("hf_path")
        if not hf:
            raise ValueError("prepare.tiny_model=true needs model.hf_path (where to write it)")
        if not (Path(hf) / "config.json").exists():
            from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

            make_tiny_checkpoint(hf, seed=int(prep.get("tiny_model_seed", 0)))
            say(f"wrote a tiny random Qwen2.5-VL to {hf}")
    data_dir = prepared_data_dir(raw)
    if data_dir is not None and not (data_dir / "README").exists():
        import datasets

        from megatron_revisual.data.synthetic import write_demo_datasets

        datasets.disable_progress_bars()  # a bar per parquet file on the user's console
        with staged_output_dir(data_dir, overwrite=True) as tmp:
            written = write_demo_datasets(
                tmp, seed=int(prep.get("synthetic_seed", 0)), task=prep.get("synthetic_task", "dots"),
                max_dots=int(prep.get("synthetic_max_dots", 4)),
                digits=tuple(prep.get("synthetic_digits", range(10))), **(prep.get("synthetic_sizes") or {}),
            )
            (tmp / "README").write_text(
                "Synthetic data of the tiny CPU demo (megatron_revisual.data.synthetic):\n"
                + "".join(f"  {k}: {v.name}\n" for k, v in written.items())
            )
        say(f"wrote synthetic datasets to {data_dir}")


def prepared_data_dir(raw: dict[str, Any]) -> Path | None:
    """Where `prepare` writes the synthetic datasets, if it does."""
    data_dir = (raw.get("prepare") or {}).get("synthetic_data")
    return Path(data_dir) if data_dir else None


def _stand_in(raw: dict[str, Any], tmp: Path) -> list[str]:
    """[`model.hf_path=<tmp>`] holding the tiny model's config.json when `prepare` will write
    model.hf_path and it does not exist yet; [] otherwise."""
    hf_path = (raw.get("model") or {}).get("hf_path")
    if not (raw.get("prepare") or {}).get("tiny_model") or not hf_path or (Path(hf_path) / "config.json").exists():
        return []
    from megatron_revisual.testing.tiny_checkpoint import build_hf_config

    build_hf_config().to_json_file(str(tmp / "config.json"))
    return [f"model.hf_path={tmp}"]


def load_config_as_prepared(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """`config.load_config`, with the sizes of the tiny model `prepare` would write when it is
    not written yet (nothing is written); the result names the recipe's own model.hf_path."""
    from megatron_revisual.config import load_config, read_raw_config

    raw = read_raw_config(path, list(overrides))
    with tempfile.TemporaryDirectory(prefix="revisual-prepare-stand-in-") as tmp:
        stand_in = _stand_in(raw, Path(tmp))
        cfg = load_config(path, [*overrides, *stand_in])
    if stand_in:  # report the real path, not the temporary one
        cfg.model.hf_path = raw["model"]["hf_path"]
    return cfg
