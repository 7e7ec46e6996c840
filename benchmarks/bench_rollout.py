"""Rollout throughput of the vLLM engine vs the transformers engine, and weight-sync bandwidth
of both against a plain in-memory copy of the same bytes.

1. Rollout: the tiny random Qwen2.5-VL (`make_tiny_checkpoint`, fp32), P prompts (half with an
   image) x N samples x T new tokens, temperature 1, seed 0. Tokens/s counts generated tokens
   (a sample may stop early at EOS). vLLM runs twice: plain CPU weights (F.linear, the
   default) and oneDNN-prepacked weights. Target from the issue: vLLM >= 1.0x transformers.
2. Weight sync: a random text-only Qwen2 of ~0.51 B parameters (hidden 1536, 20 layers, ffn
   4352, 12 heads / 2 KV groups, fp32, 2.05 GB) written once to a temporary directory. The
   stream is the model's HF tensors, already in memory (as `stream_hf_tensors` yields them);
   timed from the first tensor pulled to the engine ready again (vLLM with plain CPU weights,
   the default: load_weights into the live parameters; vLLM prepacked: the layerwise reload,
   oneDNN repacking included; transformers: copies into the parameters). Baseline: the
   same tensors copied into preallocated tensors of the same shapes (`Tensor.copy_`), in the
   same process. Target from the issue: sync >= 0.25x the copy.
   Also measured: the same sync into a vLLM engine in another process (`EngineProcess`, what
   the CPU runner uses), through shared memory (the default) and through the TCP socket.
Each measurement runs in a fresh spawned process (one vLLM engine per process); vLLM gets
VLLM_CPU_KVCACHE_SPACE=1 and one OpenMP thread, as in the tests.

CPU:   python benchmarks/bench_rollout.py                     # 64 x 8 x 128, ~10 min on 2 busy cores
Quick: python benchmarks/bench_rollout.py --prompts 8 --samples 4 --tokens 32 --sync-layers 4
GPU:   the same command; vLLM then uses the GPU (bf16 recommended: --dtype bfloat16)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from pathlib import Path

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _run_and_report(queue, fn, args) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException:
        queue.put(("error", traceback.format_exc()))


def _in_child(fn, *args):
    """Run fn(*args) in a fresh spawned process (each vLLM engine gets its own process; not a
    pool worker, which being daemonic could not start an EngineProcess)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_run_and_report, args=(queue, fn, args))
    process.start()
    while True:
        try:
            status, value = queue.get(timeout=5)
            break
        except Exception:
            if not process.is_alive():
                raise RuntimeError(
                    f"{fn.__name__} died with exit code {process.exitcode}"
                ) from None
    process.join()
    if status == "error":
        raise RuntimeError(f"{fn.__name__} failed:\n{value}")
    return value


def _requests(model_dir: str, prompts: int):
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    from megatron_revisual.rollout.types import RolloutRequest

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i in range(prompts):
        with_image = i % 2 == 0
        content = ([{"type": "image"}] if with_image else []) + [
            {"type": "text", "text": f"Question {i}: find x if {i}x + 3 = {2 * i + 7}."}
        ]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        image = None
        if with_image:
            rng = np.random.default_rng(i)
            image = Image.fromarray(rng.integers(0, 256, size=(112, 140, 3), dtype=np.uint8))
        out.append(RolloutRequest.with_image(prompt, image))
    return out


def bench_generate(
    kind: str, model_dir: str, prompts: int, samples: int, tokens: int, dtype: str
) -> dict:
    os.environ.update(ENV)
    import torch

    torch.set_num_threads(1)
    from megatron_revisual.rollout.engine import HFEngineConfig, VLLMEngineConfig
    from megatron_revisual.rollout.registry import create_engine
    from megatron_revisual.rollout.types import SamplingConfig

    common = {"model_path": model_dir, "dtype": dtype, "max_model_len": 1024}
    if kind.startswith("vllm"):
        config = VLLMEngineConfig(
            **common, enforce_eager=True, max_num_seqs=256, cpu_prepack_weights=kind.endswith("prepacked")
        )
    else:
        config = HFEngineConfig(**common)
    start = time.perf_counter()
    engine = create_engine(config)
    startup = time.perf_counter() - start
    requests = _requests(model_dir, prompts)
    engine.generate(requests[:2], SamplingConfig(n=2, max_tokens=4, seed=1))  # warm-up
    batch = engine.generate(
        requests, SamplingConfig(n=samples, max_tokens=tokens, temperature=1.0, seed=0)
    )
    return {
        "engine": kind,
        "startup_s": startup,
        "samples": len(batch.samples),
        "tokens": batch.num_generated_tokens,
        "seconds": batch.seconds,
        "tokens_per_s": batch.tokens_per_second,
    }


def _random_stream_tensors(model_dir: str):
    import torch

    from megatron_revisual.convert.hf_load import SafetensorsReader

    reader = SafetensorsReader(model_dir)
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name in sorted(reader.names()):
        t = reader.get(name)
        out[name] = torch.empty_like(t).normal_(0, 0.02, generator=gen) + (
            1.0 if t.ndim == 1 and name.endswith("norm.weight") else 0.0
        )
        del t
    return out


def _memcpy(tensors: dict) -> dict:
    import torch

    dst = {n: torch.empty_like(t) for n, t in tensors.items()}
    for n, t in tensors.items():  # touch the pages once, so the timed copy is not page faults
        dst[n].copy_(t)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for n, t in tensors.items():
            dst[n].copy_(t)
        best = min(best, time.perf_counter() - start)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"bytes": nbytes, "seconds": best, "gb_per_s": nbytes / best / 1e9}


def bench_sync(kind: str, model_dir: str, dtype: str, bucket_bytes: int) -> dict:
    os.environ.update(ENV)
    import torch

    torch.set_num_threads(1)
    from megatron_revisual.rollout.engine import HFEngineConfig, VLLMEngineConfig
    from megatron_revisual.rollout.registry import create_engine
    from megatron_revisual.rollout.remote import EngineProcess

    tensors = _random_stream_tensors(model_dir)
    result = {"engine": kind, "params": sum(t.numel() for t in tensors.values())}
    result["memcpy"] = _memcpy(tensors)
    common = {"model_path": model_dir, "dtype": dtype, "max_model_len": 512}
    vllm_common = common | {
        "enforce_eager": True,
        "max_num_seqs": 8,
        "cpu_prepack_weights": kind.endswith("prepacked"),
    }
    if kind == "transformers":
        engine = create_engine(HFEngineConfig(**common))
    elif kind.startswith("vllm-process"):
        config = VLLMEngineConfig(**vllm_common)
        transport = "socket" if "socket" in kind else "shm"
        engine = EngineProcess(
            config, env=ENV, start_timeout_s=1200, call_timeout_s=1200, weight_transport=transport
        )
    else:
        engine = create_engine(VLLMEngineConfig(**vllm_common))
    runs = []
    for _ in range(2):  # the first sync also pays for first-touch allocations
        stats = engine.update_weights(iter(tensors.items()), bucket_bytes=bucket_bytes)
        runs.append(dataclasses.asdict(stats) | {"gb_per_s": stats.gb_per_second})
    engine.close()
    result["sync"] = runs
    result["ratio_vs_memcpy"] = max(r["gb_per_s"] for r in runs) / result["memcpy"]["gb_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--sync-layers", type=int, default=20, help="layers of the ~0.5 B sync model"
    )
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument(
        "--sync-engines",
        default="vllm,vllm-prepacked,vllm-process,vllm-process-socket,transformers",
        help="comma-separated: vllm (plain CPU weights), vllm-prepacked (oneDNN), "
        "vllm-process (shared memory), vllm-process-socket (TCP), transformers",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from megatron_revisual.testing.tiny_checkpoint import TinySpec, make_tiny_checkpoint

    results: dict = {"args": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        if not args.skip_generate:
            tiny = str(make_tiny_checkpoint(Path(tmp) / "tiny_vl", seed=0))
            gen = {
                k: _in_child(
                    bench_generate, k, tiny, args.prompts, args.samples, args.tokens, args.dtype
                )
                for k in ("vllm", "vllm-prepacked", "transformers")
            }
            for k in ("vllm", "vllm-prepacked"):
                gen[f"{k}_vs_transformers"] = (
                    gen[k]["tokens_per_s"] / gen["transformers"]["tokens_per_s"]
                )
            results["generate"] = gen
            print(json.dumps(gen, indent=1), flush=True)
        if not args.skip_sync:
            spec = TinySpec(
                hidden_size=1536,
                intermediate_size=4352,
                num_hidden_layers=args.sync_layers,
                num_attention_heads=12,
                num_key_value_heads=2,
                mrope_section=(16, 24, 24),
            )
            big = str(
                make_tiny_checkpoint(Path(tmp) / "qwen2_05b", text_only=True, seed=0, spec=spec)
            )
            sync = {
                k: _in_child(bench_sync, k, big, args.dtype, args.bucket_mb << 20)
                for k in args.sync_engines.split(",")
            }
            results["sync"] = sync
            print(json.dumps(sync, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
