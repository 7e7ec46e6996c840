"""`revisual convert`: Hugging Face <-> Megatron-Core checkpoints, and a logit check between them.

    revisual convert hf-to-mcore --hf DIR --out DIR [--tp N --pp M [--first-stage-layers K]] [--overwrite]
    revisual convert mcore-to-hf --ckpt DIR --out DIR [--hf-config DIR] [--max-shard-size 5GB] [--overwrite]
    revisual convert verify --hf DIR --ckpt DIR [--tp N --pp M [--first-stage-layers K]] \
        [--prompt TEXT ...] [--image PATH ...]

Also runnable as `python -m megatron_revisual.convert.cli ...`. Conversion runs on CPU (gloo
ranks for --tp/--pp > 1); the tensors stream through one at a time, so memory stays far below
the checkpoint size. The Megatron checkpoint loads at any TP/PP later (dist_checkpointing
reshards), so --tp/--pp of hf-to-mcore only choose how many processes write it. Outputs appear
under --out only when complete; an existing --out is replaced only with --overwrite. A --pp
that does not divide the layers splits them as training does with
parallel.num_layers_in_first_pipeline_stage: --first-stage-layers on the first stage, the rest
evenly; without it, the split whose largest stage is smallest (e.g. 28 layers at --pp 3: 8, 10, 10).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses them; KiB/MiB/GiB binary)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


FIRST_STAGE_HELP = ("layers on the first pipeline stage, the rest split evenly (default: even, or "
                    "when --pp does not divide the layers the split whose largest stage is smallest)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a number >= 0")
    return value


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the hf-to-mcore / mcore-to-hf / verify subcommands to `parser` (dest: convert_command)."""
    sub = parser.add_subparsers(dest="convert_command", required=True)

    p = sub.add_parser(
        "hf-to-mcore", help="HF directory -> Megatron-Core distributed checkpoint (torch_dist)"
    )
    p.add_argument(
        "--hf", required=True, type=Path, help="Hugging Face model directory (safetensors)"
    )
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument(
        "--tp", type=_positive, default=1, help="tensor-parallel ranks writing it (loads at any TP)"
    )
    p.add_argument(
        "--pp",
        type=_positive,
        default=1,
        help="pipeline-parallel ranks writing it (loads at any PP)",
    )
    p.add_argument("--first-stage-layers", type=_positive, default=None, help=FIRST_STAGE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = sub.add_parser(
        "mcore-to-hf", help="Megatron-Core checkpoint (converted or trained) -> HF directory"
    )
    p.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        help="dist checkpoint dir, or a training save dir with latest_checkpointed_iteration.txt",
    )
    p.add_argument("--out", required=True, type=Path, help="HF directory to write")
    p.add_argument(
        "--hf-config",
        type=Path,
        default=None,
        help="HF directory whose config / tokenizer / processor files to use "
        "(default: the copies stored in the checkpoint by hf-to-mcore)",
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        help="largest safetensors file (default 5GB, the Hub's limit)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = sub.add_parser("verify", help="compare logits of an HF directory and a Megatron checkpoint")
    p.add_argument("--hf", required=True, type=Path, help="Hugging Face model directory")
    p.add_argument("--ckpt", required=True, type=Path, help="Megatron distributed checkpoint")
    p.add_argument(
        "--tp", type=_positive, default=1, help="tensor-parallel size to load the checkpoint at"
    )
    p.add_argument(
        "--pp", type=_positive, default=1, help="pipeline-parallel size to load the checkpoint at"
    )
    p.add_argument("--first-stage-layers", type=_positive, default=None, help=FIRST_STAGE_HELP)
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="a prompt (repeatable); default: built-in batch",
    )
    p.add_argument(
        "--image",
        action="append",
        default=None,
        help="an image file (repeatable), attached in order to the prompts, one per prompt",
    )
    p.add_argument(
        "--max-diff",
        type=_non_negative,
        default=1e-3,
        help="largest max_abs_logit_diff that passes (fp32 on both sides; default 1e-3); "
        "exit status 1 above it or when the weights differ",
    )


def run_convert(args: argparse.Namespace) -> int:
    """Run the parsed `revisual convert ...` command; 0 on success, 1 when verify finds a
    mismatch, 2 on bad input or a failed write (a full disk)."""
    from megatron_revisual.convert.safetensors_io import ConvertError
    from megatron_revisual.staged_dir import OutputWriteError

    command = args.convert_command
    try:
        if command == "hf-to-mcore":
            from megatron_revisual.convert.dist_ckpt import convert_hf_to_mcore

            out = convert_hf_to_mcore(
                args.hf, args.out, tp=args.tp, pp=args.pp, overwrite=args.overwrite,
                first_stage_layers=args.first_stage_layers,
            )
            print(
                f"wrote Megatron checkpoint {out} (saved from TP={args.tp}, PP={args.pp}; loads at any layout)"
            )
        elif command == "mcore-to-hf":
            from megatron_revisual.convert.dist_ckpt import convert_mcore_to_hf

            out = convert_mcore_to_hf(
                args.ckpt,
                args.out,
                hf_config_dir=args.hf_config,
                overwrite=args.overwrite,
                max_shard_bytes=args.max_shard_size,
            )
            print(f"wrote Hugging Face directory {out}")
        elif command == "verify":
            from megatron_revisual.convert.verify import failures, format_report, verify

            report = verify(
                args.hf, args.ckpt, tp=args.tp, pp=args.pp, first_stage_layers=args.first_stage_layers,
                prompts=args.prompt, images=args.image,
            )
            print(format_report(report))
            problems = failures(report, args.max_diff)
            if problems:
                print(f"revisual convert verify: FAILED: {'; '.join(problems)}", file=sys.stderr)
                return 1
        else:  # argparse's `required=True` makes this unreachable
            raise ValueError(f"unknown convert command {command!r}")
    except (ConvertError, FileExistsError, OutputWriteError) as e:
        print(f"revisual convert {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="revisual convert", description=__doc__.split("\n\n")[0])
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(argv))


def exit_without_teardown(code: int) -> NoReturn:
    """End a convert command's process once its outcome is printed. By then every output is
    fsynced and renamed into place; what interpreter shutdown would still do is mostly torch's
    teardown of its operator libraries, 0.6-1.5 s of a conversion that takes a few (python -c
    'import torch, torch.distributed.checkpoint' exits that much sooner through os._exit)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
