"""Checkpoint conversion throughput and peak memory on a generated checkpoint of >= 4 GB.

    .venv/bin/python benchmarks/bench_convert.py                 # 7B widths, 6 LM + 4 vision layers, bf16
    .venv/bin/python benchmarks/bench_convert.py --layers 12 --workdir /scratch/bench

Writes a random Qwen2.5-VL checkpoint with the 7B widths (hidden 3584, ffn 18944, vocabulary
152064, untied; vision 1280 / 3420) but few layers, then times, in the same run:
`cp -r` of the HF directory (the baseline, with and without a final `sync`), `revisual convert
hf-to-mcore` and `mcore-to-hf` as separate processes (start-up included), and checks the
round trip is bitwise. Peak memory is the largest sum of RSS over the converter's process tree,
sampled every 20 ms, next to the target of 25% of the checkpoint size + 1 GiB. Prints one JSON
line; everything generated is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def bitwise_equal(a: Path, b: Path) -> bool:
    from megatron_revisual.convert.safetensors_io import HFCheckpoint

    ra, rb = HFCheckpoint(a), HFCheckpoint(b)
    if set(ra.names()) != set(rb.names()):
        return False
    return all(
        torch.equal(ra.get(n), rb.get(n)) and ra.info(n).dtype == rb.info(n).dtype
        for n in ra.names()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="language layers (7B has 28)")
    parser.add_argument("--vision-layers", type=int, default=4, help="vision blocks (7B has 32)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cli = [sys.executable, "-m", "megatron_revisual.convert.cli"]
    try:
        hf, ckpt, back, copy = work / "hf", work / "mcore", work / "hf_back", work / "hf_copy"
        t = time.perf_counter()
        weight_bytes = make_checkpoint(hf, args.layers, args.vision_layers)
        gen_s = time.perf_counter() - t
        size = tree_bytes(hf)

        cp_s, _ = timed(["cp", "-r", str(hf), str(copy)])
        shutil.rmtree(copy)
        cp_sync_s, _ = timed(["sh", "-c", f"cp -r '{hf}' '{copy}' && sync -f '{copy}'"])
        shutil.rmtree(copy)

        to_mcore_s, to_mcore_rss = timed(
            [*cli, "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt)], env
        )
        to_hf_s, to_hf_rss = timed(
            [*cli, "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back)], env
        )
        idle_s, idle_rss = timed(
            [sys.executable, "-c", "import megatron_revisual.convert.dist_ckpt"], env
        )
        same = bitwise_equal(hf, back)
        target = 0.25 * size + GiB
        report = {
            "checkpoint_bytes": size,
            "weight_bytes": weight_bytes,
            "generate_s": round(gen_s, 1),
            "cp_s": round(cp_s, 2),
            "cp_sync_s": round(cp_sync_s, 2),
            "hf_to_mcore_s": round(to_mcore_s, 2),
            "mcore_to_hf_s": round(to_hf_s, 2),
            "import_only_s": round(idle_s, 2),
            "hf_to_mcore_vs_cp": round(cp_s / to_mcore_s, 3),
            "mcore_to_hf_vs_cp": round(cp_s / to_hf_s, 3),
            "hf_to_mcore_vs_cp_sync": round(cp_sync_s / to_mcore_s, 3),
            "mcore_to_hf_vs_cp_sync": round(cp_sync_s / to_hf_s, 3),
            # the same ratios with the interpreter start-up (importing torch + megatron) left out
            "hf_to_mcore_vs_cp_sync_after_import": round(
                cp_sync_s / max(to_mcore_s - idle_s, 1e-9), 3
            ),
            "mcore_to_hf_vs_cp_sync_after_import": round(
                cp_sync_s / max(to_hf_s - idle_s, 1e-9), 3
            ),
            "hf_to_mcore_peak_rss_gib": round(to_mcore_rss / GiB, 3),
            "mcore_to_hf_peak_rss_gib": round(to_hf_rss / GiB, 3),
            "import_only_rss_gib": round(idle_rss / GiB, 3),
            "rss_target_gib": round(target / GiB, 3),
            "rss_ok": max(to_mcore_rss, to_hf_rss) <= target,
            "throughput_ok": min(cp_s / to_mcore_s, cp_s / to_hf_s) >= 0.5,
            "bitwise_round_trip": same,
        }
        print(json.dumps(report))
        return 0 if same else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
