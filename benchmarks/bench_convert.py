"""Checkpoint conversion throughput and peak memory on a generated checkpoint of >= 4 GB.

    .venv/bin/python benchmarks/bench_convert.py                 # 7B widths, 6 LM + 4 vision layers, bf16
    .venv/bin/python benchmarks/bench_convert.py --layers 12 --workdir /scratch/bench
    .venv/bin/python benchmarks/bench_convert.py --bridge-python /scratch/bridge-venv/bin/python

Writes a random Qwen2.5-VL checkpoint with the 7B widths (hidden 3584, ffn 18944, vocabulary
152064, untied; vision 1280 / 3420) but few layers, then times, in the same run: `cp -r` of the
HF directory (the baseline, with and without a final `sync`), `revisual convert hf-to-mcore` and
`mcore-to-hf` as separate processes (start-up included), and checks the round trip is bitwise.
Each command runs `--rounds` times (default 3), in an order that turns every round, each time
with only the inputs on disk (earlier outputs removed, `sync` first), and the medians are
reported with every round's figures. One run of each is not enough on a virtual machine: the
same `cp -r` of the same 5 GB took 4 s and 14 s minutes apart, depending on what the previous
command left in the page cache and on the host's memory. Peak memory is the largest sum of RSS
over the converter's process tree, sampled every 20 ms, next to the target of 25% of the
checkpoint size + 1 GiB. Prints one JSON line; everything generated is deleted at the end.
Profile a conversion with the dev extra's py-spy: `py-spy record -o h2m.svg -- .venv/bin/python
-m megatron_revisual.convert.cli hf-to-mcore --hf HF --out OUT`.

Megatron-Bridge, for comparison (--bridge-python): its HF -> Megatron and Megatron -> HF
conversion of the same checkpoint, timed and sampled the same way, in an interpreter where
megatron-bridge 0.6.2 imports. It is never a dependency of this project; a scratch environment
outside the repository that reuses this one's torch and megatron-core:

    .venv/bin/python -m venv /scratch/bridge-venv
    echo "$PWD/.venv/lib/python3.12/site-packages" > \
        /scratch/bridge-venv/lib/python3.12/site-packages/zz_revisual.pth
    /scratch/bridge-venv/bin/pip install --no-deps megatron-bridge==0.6.2 nvidia-modelopt \
        megatron-energon multi-storage-client xattr wcmatch bracex braceexpand rapidyaml \
        deprecation filetype webdataset tensorboard pulp orloge cpsat-logutils ipython traitlets \
        hydra-core scipy  # what its imports need on a CPU machine, found one ImportError at a time

The Bridge side runs on CPU (gloo) as its own `export_ckpt` does, with three things changed
because there is no GPU: Transformer Engine, which Bridge imports unconditionally, is a stub
module seen by Bridge's modules only (no TE code runs: the model is built with Bridge's own
`local_layer_spec` and its CUDA fusions off); Megatron-Core's hard-coded CUDA calls go to the
CPU through this project's `parallel.cpu_compat`; the import step is `import_ckpt`'s three
calls (from_hf_pretrained, provide_distributed_model, save_megatron_model) with that spec.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def make_checkpoint(out: Path, layers: int, vision_layers: int, seed: int = 0) -> int:
    """A random bf16 Qwen2.5-VL with 7B widths; returns the weight bytes. Streams tensors to disk."""
    import dataclasses

    from transformers import Qwen2_5_VLConfig

    from megatron_revisual.config.schema import VisionConfig
    from megatron_revisual.convert.hf_write import write_hf_weights
    from megatron_revisual.convert.safetensors_io import TensorSpec
    from megatron_revisual.models.qwen25_vl.presets import hf_config_dict, qwen25_vl_7b
    from megatron_revisual.testing.tiny_checkpoint import checkpoint_tensor_shapes

    model = dataclasses.replace(
        qwen25_vl_7b(),
        num_layers=layers,
        vision=VisionConfig(
            intermediate_size=3420, depth=vision_layers, fullatt_block_indexes=[vision_layers - 1]
        ),
    )
    config = hf_config_dict(model)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shapes = checkpoint_tensor_shapes(Qwen2_5_VLConfig(**config))
    specs = [TensorSpec(n, tuple(s), torch.bfloat16) for n, s in sorted(shapes.items())]
    gen = torch.Generator().manual_seed(seed)

    def tensors():
        for spec in specs:
            yield spec.name, (torch.randn(spec.shape, generator=gen) * 0.02).to(torch.bfloat16)

    write_hf_weights(out, specs, tensors())
    return sum(s.nbytes for s in specs)


class TreeRss:
    """Peak of the summed resident set of a process and its descendants, sampled."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        pids, frontier = [self.pid], [self.pid]
        while frontier:
            pid = frontier.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            pids += map(int, children)
            frontier += map(int, children)
        return pids

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            total = 0
            for pid in self._tree():
                try:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
                except (OSError, IndexError, ValueError):
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    rss = TreeRss(proc.pid)
    output, _ = proc.communicate()
    elapsed = time.perf_counter() - start
    peak = rss.stop()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return elapsed, peak


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def round_trip_difference(a: Path, b: Path) -> str | None:
    """None when every tensor of HF directory `b` equals `a`'s bitwise (dtype included); else
    the first difference."""
    from megatron_revisual.convert.safetensors_io import HFCheckpoint

    ra, rb = HFCheckpoint(a), HFCheckpoint(b)
    if set(ra.names()) != set(rb.names()):
        return f"names differ: {sorted(set(ra.names()) ^ set(rb.names()))[:3]}"
    for n in sorted(ra.names()):
        if ra.info(n).dtype != rb.info(n).dtype:
            return f"{n}: {ra.info(n).dtype} became {rb.info(n).dtype}"
        if not torch.equal(ra.get(n), rb.get(n)):
            return f"{n}: values differ"
    return None


def _stub_transformer_engine_for_bridge() -> None:
    """Megatron-Bridge imports Transformer Engine at module level; on CPU it gets a stub that
    only Bridge's own modules see (Megatron-Core's `import transformer_engine` still fails, so
    it keeps its non-TE paths). Calling anything in the stub raises."""
    import builtins
    import types

    class Stub(types.ModuleType):
        def __getattr__(self, name: str):  # noqa: ANN204
            if name.startswith("__"):
                raise AttributeError(name)
            sub = Stub(f"{self.__name__}.{name}")
            setattr(self, name, sub)
            return sub

        def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
            raise RuntimeError(f"{self.__name__} is a CPU stub (no Transformer Engine here)")

        def __mro_entries__(self, bases):  # noqa: ANN001, ANN204
            return (object,)

    stub, real_import = Stub("transformer_engine"), builtins.__import__

    def import_(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002, ANN001, ANN202
        caller = (globals or {}).get("__name__", "")
        if name.split(".")[0] == "transformer_engine" and caller.startswith("megatron.bridge"):
            mod = stub
            for part in name.split(".")[1:] if fromlist else ():
                mod = getattr(mod, part)
            return mod
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = import_


def bridge_worker(direction: str, src: str, out: str, hf_dir: str) -> None:
    """Megatron-Bridge's conversion of `src` into `out` on CPU, in this (Bridge) interpreter."""
    _stub_transformer_engine_for_bridge()
    from megatron_revisual.parallel.cpu_compat import install_cpu_compat

    install_cpu_compat()
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.bridge.training.model_load_save import temporary_distributed_context

    bridge = AutoBridge.from_hf_pretrained(hf_dir, torch_dtype=torch.bfloat16)
    if direction == "mcore-to-hf":
        bridge.export_ckpt(src, out, show_progress=False)  # gloo on CPU, as it is written
        return
    with temporary_distributed_context(backend="gloo"):
        provider = bridge.to_megatron_provider(load_weights=True)
        provider.transformer_layer_spec = local_layer_spec
        for flag in ("gradient_accumulation_fusion", "masked_softmax_fusion", "bias_activation_fusion",
                     "bias_dropout_fusion", "apply_rope_fusion", "persist_layer_norm"):
            if hasattr(provider, flag):
                setattr(provider, flag, False)  # CUDA kernels
        provider.finalize()
        model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
        bridge.save_megatron_model(model, out, hf_tokenizer_path=hf_dir, low_memory_save=True)


def figures(prefix: str, size: int, cp_sync_s: float, to_mcore: tuple, to_hf: tuple) -> dict:
    """Seconds, GB/s, ratio to cp + sync and peak RSS of both directions ((s, rss) each)."""
    out = {}
    for direction, (seconds, rss) in (("hf_to_mcore", to_mcore), ("mcore_to_hf", to_hf)):
        out[f"{prefix}{direction}_s"] = round(seconds, 2)
        out[f"{prefix}{direction}_gb_per_s"] = round(size / seconds / 1e9, 3)
        out[f"{prefix}{direction}_vs_cp_sync"] = round(cp_sync_s / seconds, 3)
        out[f"{prefix}{direction}_peak_rss_gib"] = round(rss / GiB, 3)
    return out


def time_bridge(python: str, hf: Path, work: Path, env: dict, size: int, cp_sync_s: float) -> dict:
    ckpt, back = work / "bridge_mcore", work / "bridge_hf_back"
    env = {**env, "PYTHONPATH": str(ROOT)}
    worker = [python, str(Path(__file__).resolve()), "--bridge-worker"]
    to_mcore_s, to_mcore_rss = timed([*worker, "hf-to-mcore", str(hf), str(ckpt), str(hf)], env)
    to_hf_s, to_hf_rss = timed([*worker, "mcore-to-hf", str(ckpt), str(back), str(hf)], env)
    report = figures("bridge_", size, cp_sync_s, (to_mcore_s, to_mcore_rss), (to_hf_s, to_hf_rss))
    report["bridge_round_trip_difference"] = round_trip_difference(hf, back)
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(back, ignore_errors=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="language layers (7B has 28)")
    parser.add_argument("--vision-layers", type=int, default=4, help="vision blocks (7B has 32)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument(
        "--rounds", type=int, default=3, help="times each command runs; medians are reported"
    )
    parser.add_argument(
        "--bridge-python", default=None, help="an interpreter with megatron-bridge (see above)"
    )
    parser.add_argument("--bridge-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bridge_worker:
        bridge_worker(*args.bridge_worker)
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cli = [sys.executable, "-m", "megatron_revisual.convert.cli"]
    try:
        hf, ckpt, back, copy = work / "hf", work / "mcore", work / "hf_back", work / "hf_copy"
        ckpt2 = work / "mcore_timed"
        t = time.perf_counter()
        weight_bytes = make_checkpoint(hf, args.layers, args.vision_layers)
        os.sync()  # the generated files' dirty pages would otherwise be written during the first copy
        gen_s = time.perf_counter() - t
        size = tree_bytes(hf)

        # The reference Megatron checkpoint mcore-to-hf reads in every round (made, not timed).
        timed([*cli, "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt)], env)
        commands = {
            "cp": ["cp", "-r", str(hf), str(copy)],
            "cp_sync": ["sh", "-c", f"cp -r '{hf}' '{copy}' && sync -f '{copy}'"],
            "hf_to_mcore": [*cli, "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt2)],
            "mcore_to_hf": [*cli, "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back)],
        }
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
        names = list(commands)
        for r in range(args.rounds):
            # the order turns every round, so no command always runs right after the same one
            for name in names[r % len(names):] + names[: r % len(names)]:
                for out in (copy, ckpt2, back):  # each command starts with only the inputs on disk
                    shutil.rmtree(out, ignore_errors=True)
                os.sync()
                converter = name in ("hf_to_mcore", "mcore_to_hf")
                runs[name].append(timed(commands[name], env if converter else None))
        if not back.exists():  # the last round ended with another command, which removed it
            timed(commands["mcore_to_hf"], env)
        med = {name: statistics.median(s for s, _ in values) for name, values in runs.items()}
        peak = {name: max(m for _, m in values) for name, values in runs.items()}
        # per round: each converter against that round's cp + sync
        round_ratios = {
            d: [round(c[0] / x[0], 3) for c, x in zip(runs["cp_sync"], runs[d], strict=True)]
            for d in ("hf_to_mcore", "mcore_to_hf")
        }
        cp_s, cp_sync_s = med["cp"], med["cp_sync"]
        to_mcore_s, to_mcore_rss = med["hf_to_mcore"], peak["hf_to_mcore"]
        to_hf_s, to_hf_rss = med["mcore_to_hf"], peak["mcore_to_hf"]
        idle_s, idle_rss = timed(
            [sys.executable, "-c", "import megatron_revisual.convert.dist_ckpt"], env
        )
        difference = round_trip_difference(hf, back)
        for out in (ckpt, ckpt2, back, copy):
            shutil.rmtree(out, ignore_errors=True)
        bridge = {}
        if args.bridge_python:
            bridge = time_bridge(args.bridge_python, hf, work, env, size, cp_sync_s)
        target = 0.25 * size + GiB
        report = {
            "checkpoint_bytes": size,
            "weight_bytes": weight_bytes,
            "generate_s": round(gen_s, 1),
            "cp_s": round(cp_s, 2),
            "cp_sync_s": round(cp_sync_s, 2),
            "rounds": args.rounds,
            "seconds_per_round": {n: [round(t, 2) for t, _ in v] for n, v in runs.items()},
            "vs_cp_sync_per_round": round_ratios,
            **figures("", size, cp_sync_s, (to_mcore_s, to_mcore_rss), (to_hf_s, to_hf_rss)),
            "import_only_s": round(idle_s, 2),
            "hf_to_mcore_vs_cp": round(cp_s / to_mcore_s, 3),
            "mcore_to_hf_vs_cp": round(cp_s / to_hf_s, 3),
            # the same ratios with the interpreter start-up (importing torch and the converter) left out
            "hf_to_mcore_vs_cp_sync_after_import": round(
                cp_sync_s / max(to_mcore_s - idle_s, 1e-9), 3
            ),
            "mcore_to_hf_vs_cp_sync_after_import": round(
                cp_sync_s / max(to_hf_s - idle_s, 1e-9), 3
            ),
            "import_only_rss_gib": round(idle_rss / GiB, 3),
            "rss_target_gib": round(target / GiB, 3),
            "rss_ok": max(to_mcore_rss, to_hf_rss) <= target,
            "throughput_ok": min(cp_sync_s / to_mcore_s, cp_sync_s / to_hf_s) >= 0.5,
            "bitwise_round_trip": difference is None,
            "round_trip_difference": difference,
            **bridge,
        }
        print(json.dumps(report))
        return 0 if difference is None else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
