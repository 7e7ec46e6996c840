"""The `revisual` command.

    revisual make-tiny --out runs/tiny [--text-only] [--seed 0] [--overwrite]
    revisual config configs/qwen25_vl_7b_8xh100.yaml parallel.tensor_model_parallel_size=2
    revisual demo [--config configs/tiny_cpu_demo.yaml] [dotted.overrides ...]
    revisual eval --model-name NAME --openai-base-url URL --dataset-dir DIR --datasets all
    revisual serve MODEL_DIR [--port 8000]
    revisual infer --model DIR --image PATH --question TEXT
    revisual convert hf-to-mcore --hf DIR --out DIR [--tp N --pp M]   (also mcore-to-hf, verify)
    revisual train configs/tiny_cpu_demo.yaml [dotted.overrides ...] [--resume auto|none|DIR] [--verbose]
    revisual plot runs/tiny_cpu_demo    (curves.png and the summary table of a run)
    revisual data configs/qwen25_vl_7b_8xh100.yaml --rows 64   (the data through the training code)
    revisual plan configs/qwen25_vl_7b_8xh100.yaml             (memory and step time per stage)

Heavy imports (torch, megatron, vllm) happen inside the subcommands so `--help` and config
checks stay fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_DEMO_CONFIG = "configs/tiny_cpu_demo.yaml"


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.out, text_only=args.text_only, seed=args.seed, overwrite=args.overwrite)
    kind = "Qwen2 (text-only)" if args.text_only else "Qwen2.5-VL"
    print(f"wrote tiny {kind} checkpoint to {out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from megatron_revisual.config import dump_config
    from megatron_revisual.prepare import load_config_as_prepared

    cfg = load_config_as_prepared(args.config, args.overrides)  # a fresh clone's demo: no tiny model yet
    print(dump_config(cfg), end="")
    p = cfg.parallel
    print(
        f"# layout: world {cfg.cluster.world_size} = TP {p.tensor_model_parallel_size} x PP "
        f"{p.pipeline_model_parallel_size} x CP {p.context_parallel_size} x DP {cfg.data_parallel_size}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from megatron_revisual.demo import run_demo

    return run_demo(args.config, args.overrides, skip_vllm=args.skip_vllm)


def _cmd_plot(args: argparse.Namespace) -> int:
    from megatron_revisual.train.report import read_metrics, summary_table, write_curves

    try:
        rows = read_metrics(args.run_dir)
        path = write_curves(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"revisual plot: error: {e}", file=sys.stderr)
        return 2
    print(summary_table(rows, args.run_dir))
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revisual", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random Qwen2.5-VL (or Qwen2) HF checkpoint")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--text-only", action="store_true", help="a Qwen2 language model without vision tower")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("config", help="load, override and validate a config; print the result")
    p.add_argument("config", help="YAML file under configs/")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("demo", help="the tiny CPU smoke run of everything that exists")
    p.add_argument("--config", default=DEFAULT_DEMO_CONFIG)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.train_iters=3")
    p.add_argument("--skip-vllm", action="store_true", help="leave out the vLLM generation step")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("plot", help="draw RUN_DIR/curves.png and print the summary table of a training run")
    p.add_argument("run_dir", type=Path, help="the output_dir of a `revisual train` run")
    p.set_defaults(func=_cmd_plot)
    # Subcommands whose arguments live beside their implementation; imported lazily.
    for name, module, help_text in (
        ("eval", "megatron_revisual.evaluation.runner", "ReVisual benchmarks through an OpenAI-compatible endpoint"),
        ("serve", "megatron_revisual.serving", "vLLM's OpenAI-compatible server for an HF model directory"),
        ("infer", "megatron_revisual.infer", "one-shot generation for an image and a question"),
        ("convert", "megatron_revisual.convert.cli", "HF <-> Megatron distributed checkpoints, and verify"),
        ("train", "megatron_revisual.train.runner",
         "the staged curriculum: cold-start SFT, multimodal GRPO, text GRPO"),
        ("plan", "megatron_revisual.launch.planner", "per-GPU memory and step time of a recipe's stages; does it fit?"),
        ("rehearse", "megatron_revisual.launch.rehearse",
         "a GPU recipe's curriculum on CPU at its real process topology, every collective checked"),
        ("data", "megatron_revisual.train.data_check",
         "read a recipe's data through the training code: rows kept and skipped, lengths, images"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=_lazy_command(module, name))
        _add_arguments(p, module, name)
    return parser


def _add_arguments(parser: argparse.ArgumentParser, module: str, name: str) -> None:
    import importlib

    getattr(importlib.import_module(module), f"add_{name}_arguments")(parser)


def _lazy_command(module: str, name: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), f"run_{name}")(args)

    return run


def _named_error(e: Exception) -> Exception | None:
    """`e` if it names what failed (a full disk, a refused output dir), or the named error a
    rank raised (`parallel.RankError`); None for anything else (a bug: keep the traceback)."""
    from megatron_revisual.config import ConfigError, ConfigValidationError
    from megatron_revisual.staged_dir import OutputWriteError

    if isinstance(e, ConfigError | ConfigValidationError | FileExistsError | OutputWriteError):
        return e
    harness = sys.modules.get("megatron_revisual.parallel.harness")  # loaded if ranks ran
    if harness is not None and isinstance(e, harness.RankError):
        from megatron_revisual.convert.safetensors_io import ConvertError
        from megatron_revisual.parallel.collective_checks import CollectiveMismatch

        return e.named_error(OutputWriteError, ConvertError, CollectiveMismatch)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except Exception as e:
        named = _named_error(e)
        if named is None:
            raise
        print(f"revisual {args.command}: error: {named}", file=sys.stderr)
        return 2
    if argv is None and args.command == "convert":  # the program itself, not a caller's call
        from megatron_revisual.convert.cli import exit_without_teardown

        exit_without_teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
