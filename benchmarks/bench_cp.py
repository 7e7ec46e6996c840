"""Context parallelism on CPU: one SFT step (`train.sft_loop.sft_update`) over the same packed
rows at CP 1 (one rank, all threads) and at CP 2 (two gloo ranks, the threads split), equal
tokens. A random Qwen2.5-VL whose language model is W wide x L layers, rows of S tokens (each
row: two text sequences of S/2 tokens), R rows per step; median step time of N steps after one
warm-up step, and each rank's peak resident memory.

On GPU, CP is for rows one GPU cannot hold; on CPU our all-gather attention (every rank holds the
whole row's K/V, exact, not fast) shows what the split costs and saves in compute: each rank runs
the MLPs and projections on half the tokens and the attention for half the queries.

    python benchmarks/bench_cp.py                      # W 256, L 4, S 2048, R 2, N 3: ~2 min on 2 cores
    python benchmarks/bench_cp.py --seq 4096 --width 512
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rank(cfg, args: dict) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.data.packing import Sample, pack_sequences
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.models.qwen25_vl.rope_index import mrope_config
    from megatron_revisual.train.builders import build_optimizer, wrap_ddp
    from megatron_revisual.train.sft_loop import _Row, sft_update

    torch.set_num_threads(args["threads"])
    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
    load_hf_weights(model, SafetensorsReader(cfg.model.hf_path), cfg.model, tp_rank=0, tp_size=1)
    ddp = wrap_ddp(cfg, model)
    optimizer, scheduler = build_optimizer(cfg, [ddp])
    g = torch.Generator().manual_seed(0)
    half = args["seq"] // 2
    rows = []
    for _ in range(args["rows"]):
        samples = [Sample(input_ids=torch.randint(3, 600, (half,), generator=g),
                          target_mask=torch.arange(half) >= half // 4) for _ in range(2)]
        rows.append(_Row(pack_sequences(samples, config=mrope_config(cfg.model),
                                        cp_size=ps.get_context_parallel_world_size())))
    tokens = float(sum(int(r.packed.loss_mask.sum()) for r in rows))
    times, losses = [], []
    for _ in range(args["steps"] + 1):
        t0 = time.perf_counter()
        total, *_ = sft_update(ddp, optimizer, scheduler, rows, tokens=tokens)
        times.append(time.perf_counter() - t0)
        losses.append(total / tokens)
    return {"step_s": statistics.median(times[1:]), "losses": losses,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    a = parser.parse_args()

    from megatron_revisual.config import load_config
    from megatron_revisual.parallel import run_distributed
    from megatron_revisual.testing.tiny_checkpoint import TinySpec, make_tiny_checkpoint

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = TinySpec(hidden_size=a.width, intermediate_size=2 * a.width, num_hidden_layers=a.layers,
                        num_attention_heads=a.width // 32, max_position_embeddings=2 * a.seq)
        hf = make_tiny_checkpoint(Path(tmp) / "hf", spec=spec)
        for cp in (1, 2):
            cfg = load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [
                f"model.hf_path={hf}", "parallel.tensor_model_parallel_size=1",
                f"parallel.context_parallel_size={cp}", "parallel.sequence_parallel=false",
                f"cluster.devices_per_node={cp}", f"train.seq_length={a.seq}",
            ])
            args = {"threads": a.cores // cp, "seq": a.seq, "rows": a.rows, "steps": a.steps}
            ranks = run_distributed(_rank, world_size=cp, cp=cp, args=(cfg, args), timeout_s=1800,
                                    threads_per_rank=a.cores // cp)
            results[cp] = {"cp": cp, "ranks": cp, "threads_per_rank": a.cores // cp,
                           "step_s": max(r["step_s"] for r in ranks),
                           "peak_rss_mib_per_rank": max(r["peak_rss_mib"] for r in ranks),
                           "first_loss": ranks[0]["losses"][0], "last_loss": ranks[0]["losses"][-1]}
            print(json.dumps(results[cp]), flush=True)
    base = results[1]["step_s"]
    print(f"\nwidth {a.width} x {a.layers} layers, {a.rows} rows of {a.seq} tokens per step, {a.cores} cores")
    print("| layout | step s | vs CP 1 | peak RSS per rank MiB | loss, first step |")
    print("| --- | --- | --- | --- | --- |")
    for cp, r in results.items():
        print(f"| CP {cp} ({r['ranks']} rank(s) x {r['threads_per_rank']} threads) | {r['step_s']:.2f} | "
              f"{base / r['step_s']:.2f}x | {r['peak_rss_mib_per_rank']:.0f} | {r['first_loss']:.6f} |")


if __name__ == "__main__":
    main()
