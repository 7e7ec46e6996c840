"""The GPU path in one script: our Qwen2.5-VL on CUDA with NCCL, checked in a few minutes.

    python benchmarks/gpu_check.py                                  # one GPU, NCCL world of 1
    torchrun --nproc-per-node 8 benchmarks/gpu_check.py             # NCCL world of 8 (DP 8)
    torchrun --nproc-per-node 8 benchmarks/gpu_check.py --rollout-tp 2   # 4 vLLM engines of TP 2
    python benchmarks/gpu_check.py --tiny                           # CPU: the same code, tiny model (CI)

The model has Qwen2.5-VL-7B's widths (hidden 3584, 28 heads / 4 KV groups, FFN 18944, vocab
152064, vision hidden 1280) with --layers language and vision layers, random weights written as
an HF checkpoint in a temporary directory (nothing is downloaded), bf16. `--tiny` uses the tiny
test model in fp32 on gloo instead. Every check prints one JSON line on rank 0:

  logits_vs_transformers   our logits against transformers' Qwen2_5_VLForConditionalGeneration on
                           the same device and weights; forward tokens/s of both and the ratio
  sft_packed_steps         5 optimizer steps on packed rows (Megatron DDP + optimizer): losses,
                           tokens/s, peak memory; fwd+bwd tokens/s over transformers' padded batch
  checkpoint_async_roundtrip the policy's checkpoint with the optimizer (reshardable format) written
                           by Megatron's async queue, loaded into a fresh policy: all equal
  grpo_steps               2 GRPO steps: weights synced into the transformers engine on the
                           device, sampling, rewards, advantages, log-probs, one update each
  te_fp8                   the Transformer Engine spec, FP8 forward/backward on a row padded to
                           the recipe's multiple (data.packing.row_length_multiple)
  vllm_generate_sleep_sync the colocated rollout: an engine per --rollout-tp ranks (on GPUs inside
                           the ranks, external_launcher); generate, sleep, wake (weights), weight
                           sync from every rank, wake (KV), generate; the engines' log-probs
                           against Megatron's after the sync; the world still works after close;
                           then a second engine in the same process (vLLM's sleep-mode allocator
                           must be empty at its load), synced, gives the same samples

A check whose package is missing prints "skipped: <package> missing", never "passed". The exit
code is 1 when any check failed. Libraries may log between the lines; the JSON lines are those
starting with {"check".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _spec(tiny: bool, layers: int):
    from megatron_revisual.testing.tiny_checkpoint import TinySpec

    if tiny:
        return TinySpec()
    return TinySpec(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers, num_attention_heads=28,
                    num_key_value_heads=4, mrope_section=(16, 24, 24), vocab_multiple=152064,
                    vision_depth=layers, vision_hidden_size=1280, vision_num_heads=16,
                    vision_intermediate_size=3420, vision_fullatt_block_indexes=(layers - 1,))


class Checker:
    def __init__(self, args: argparse.Namespace, hf_dir: Path, cfg) -> None:
        from megatron_revisual.models.common import TORCH_DTYPES
        from megatron_revisual.parallel.device import compute_device

        self.args, self.hf_dir, self.cfg = args, hf_dir, cfg
        self.device = compute_device()
        self.dtype = TORCH_DTYPES[cfg.model.params_dtype]
        self.failed = False
        self.tokens = min(cfg.model.vocab_size, 600)  # ordinary BPE ids: no special token sampled
        self.policy = None

    # -- helpers ---------------------------------------------------------------------------------
    def report(self, name: str, fn: Callable[[], dict]) -> None:
        import torch.distributed as dist

        start = time.perf_counter()
        try:
            line = {"check": name, **fn()}
        except Exception as e:  # a failed check is reported and the next one runs
            line = {"check": name, "status": "failed", "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=6)}
        line["seconds"] = round(time.perf_counter() - start, 2)
        line.setdefault("peak_memory_gib", self.peak_gib())
        if line["status"] == "failed":
            self.failed = True
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(line), flush=True)

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # host RSS

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def build(self, cfg=None):
        from megatron.core import parallel_state as ps

        from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
        from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl

        cfg = cfg or self.cfg
        model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
        load_hf_weights(model, SafetensorsReader(self.hf_dir), cfg.model,
                        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size())
        return model.to(self.device)

    def hf_model(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration.from_pretrained(self.hf_dir, dtype=self.dtype).to(self.device)

    def sequences(self, lengths: list[int], seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(3, self.tokens, (n,), generator=g) for n in lengths]

    def packed(self, seqs: list[torch.Tensor], fp8_recipe: str | None = None):
        from megatron_revisual.data.packing import Sample, pack_sequences, row_length_multiple
        from megatron_revisual.models.qwen25_vl.rope_index import mrope_config

        multiple = row_length_multiple(tp=1, sequence_parallel=False, cp=1, fp8_recipe=fp8_recipe)
        return pack_sequences([Sample(input_ids=s) for s in seqs], config=mrope_config(self.cfg.model),
                              pad_to_multiple_of=multiple)

    def timed(self, fn: Callable[[], object], repeats: int) -> float:
        fn()  # warm-up
        self.sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return (time.perf_counter() - start) / repeats

    # -- checks ----------------------------------------------------------------------------------
    def logits(self) -> dict:
        from megatron_revisual.parallel.device import to_device

        ours, theirs = self.build().eval(), self.hf_model().eval()
        (seq,) = self.sequences([self.args.seq], seed=1)
        p = to_device(self.packed([seq]))
        ids = seq[None].to(self.device)
        with torch.no_grad():
            def run_ours():
                return ours(p.input_ids, p.position_ids, packed_seq_params=p.packed_seq_params)

            def run_theirs():
                return theirs(input_ids=ids).logits

            a = run_ours()[0, : len(seq), : self.cfg.model.vocab_size].float()
            b = run_theirs()[0].float()
            diff = (a - b).abs()
            t_ours, t_theirs = self.timed(run_ours, 3), self.timed(run_theirs, 3)
        rel = float(diff.mean() / b.abs().mean())
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        return {"status": "passed" if rel <= tol else "failed", "tokens": len(seq),
                "max_abs_diff": float(diff.max()), "mean_abs_diff_over_mean_abs_logit": rel, "tolerance": tol,
                "argmax_agreement": agree, "ours_tokens_per_s": len(seq) / t_ours,
                "transformers_tokens_per_s": len(seq) / t_theirs, "ours_over_transformers": t_theirs / t_ours}

    def _policy(self):
        from megatron_revisual.train.builders import build_optimizer, wrap_ddp

        ddp = wrap_ddp(self.cfg, self.build())
        optimizer, scheduler = build_optimizer(self.cfg, [ddp])
        return ddp, optimizer, scheduler

    def sft(self) -> dict:
        from megatron.core import parallel_state as ps

        from megatron_revisual.train.schedule import (
            real_vocab_size,
            run_packed_schedule,
            step_if_finite,
            token_log_probs_and_entropy,
        )

        model, optimizer, scheduler = self._policy()
        n = self.args.seq
        lengths = [n // 2, n // 4, n // 8, n // 8] * 2  # two rows of mixed lengths
        seqs = self.sequences(lengths, seed=2)
        rows = [_Row(self.packed(seqs[:4])), _Row(self.packed(seqs[4:]))]
        targets = float(sum(int(r.packed.loss_mask.sum()) for r in rows))
        # every DP rank trains the same rows: the step's loss is the mean over all of them
        step_targets = targets * ps.get_data_parallel_world_size()
        vocab = real_vocab_size(model)

        def loss_func(row, logits):
            lp, _ = token_log_probs_and_entropy(logits, row.packed.labels, vocab, 1.0)
            nll = -(lp.float() * row.packed.loss_mask).sum()
            return nll / step_targets, {"nll": nll.detach()}

        losses = []
        self.sync()
        start = time.perf_counter()
        for _ in range(5):
            model.train()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            out = run_packed_schedule([model], rows, loss_func, forward_only=False)
            ok, _, _ = step_if_finite([model], optimizer, scheduler)
            losses.append(float(sum(float(o["nll"]) for o in out)) / targets)
        self.sync()
        seconds = (time.perf_counter() - start) / 5
        real = sum(lengths)
        hf_seconds = self._hf_train_step(seqs)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # transformers' copy is gone
        self.policy = (model, optimizer, scheduler)
        good = all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
        return {"status": "passed" if good else "failed", "losses": [round(x, 5) for x in losses],
                "tokens_per_step": real, "row_lengths": [r.packed.input_ids.shape[1] for r in rows],
                "tokens_per_s_with_optimizer_step": real / seconds,
                "transformers_padded_fwd_bwd_tokens_per_s": real / hf_seconds,
                "ours_with_optimizer_over_transformers_fwd_bwd": hf_seconds / seconds}

    def checkpoint(self) -> dict:
        """The trained policy's checkpoint (model, optimizer in Megatron's reshardable format, LR
        schedule) written in the background on Megatron's async queue (tensors staged to host, a
        forked writer), completed by the poll, then loaded into a fresh model and optimizer: every
        parameter, fp32 main parameter and Adam moment must come back equal."""
        from megatron_revisual.convert.dist_ckpt import load_model_checkpoint
        from megatron_revisual.parallel.rng import rng_state
        from megatron_revisual.train import checkpointing as ck

        model, optimizer, scheduler = self.policy or self._policy()
        saves = ck.AsyncSaves()
        self.sync()
        start = time.perf_counter()
        ck.save_checkpoint(
            Path(self.cfg.output_dir) / "checkpoints", 5,
            state=ck.training_state_dict(model.module, optimizer, scheduler), model_cfg=self.cfg.model,
            hf_side_dir=None, rank_state={"rng": rng_state()},
            trainer_state={"checkpoint_format": ck.CHECKPOINT_FORMAT, "layout": ck.current_layout()},
            async_saves=saves,
        )
        returned = time.perf_counter() - start
        (path,) = saves.poll(blocking=True)
        written = time.perf_counter() - start
        fresh, fresh_optimizer, fresh_scheduler = self._policy()
        load_model_checkpoint(fresh.module, path)
        ck.restore_training_state(path, model=fresh.module, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
        mismatched = [n for (n, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True)
                      if not torch.equal(a, b)]
        for saved, loaded in zip(ck._inner_optimizers(optimizer), ck._inner_optimizers(fresh_optimizer), strict=True):
            params = [p for g in saved.optimizer.param_groups for p in g["params"]]
            others = [p for g in loaded.optimizer.param_groups for p in g["params"]]
            for i, (a, b) in enumerate(zip(params, others, strict=True)):
                if not torch.equal(a, b):
                    mismatched.append(f"main parameter {i}")
                for key in ("exp_avg", "exp_avg_sq"):
                    if not torch.equal(saved.optimizer.state[a][key], loaded.optimizer.state[b][key]):
                        mismatched.append(f"{key} {i}")
        del fresh, fresh_optimizer, fresh_scheduler
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"status": "passed" if not mismatched else "failed", "mismatched": mismatched[:5],
                "seconds_until_training_resumes": returned, "seconds_until_complete": written}

    def _hf_train_step(self, seqs: list[torch.Tensor]) -> float:
        """Seconds of one forward+backward of transformers on the same sequences, right-padded."""
        hf = self.hf_model().train()
        longest = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        labels = ids.masked_fill(mask == 0, -100)

        def step():
            hf.zero_grad(set_to_none=True)
            hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

        return self.timed(step, 2)

    def _prompts(self, count: int) -> list:
        from transformers import AutoTokenizer

        from megatron_revisual.rollout.types import RolloutRequest

        tok = AutoTokenizer.from_pretrained(self.hf_dir)
        return [RolloutRequest(prompt=tok.apply_chat_template(
            [{"role": "user", "content": f"Count on from {k}: {k} {k + 1}"}], tokenize=False,
            add_generation_prompt=True))
            for k in range(count)]

    def _engine_vs_megatron(self, samples, model) -> float:
        """Mean |Megatron - engine| log-prob over the samples' response tokens."""
        from megatron_revisual.models.qwen25_vl.rope_index import mrope_config
        from megatron_revisual.train.grpo_step import (
            PolicySample,
            build_policy_batches,
            compute_log_probs,
            response_values,
        )

        kept = [s for s in samples if s.token_ids]
        batches = build_policy_batches(
            [PolicySample(prompt_ids=torch.tensor(s.prompt_token_ids), response_ids=torch.tensor(s.token_ids),
                          advantage=0.0) for s in kept], config=mrope_config(self.cfg.model), micro_batch_tokens=4096)
        values = response_values(batches, compute_log_probs(model, batches))
        diffs = torch.cat([(values[k] - torch.tensor(s.logprobs)).abs() for k, s in enumerate(kept)])
        return float(diffs.mean())

    def grpo(self) -> dict:
        from megatron_revisual.convert.export import stream_hf_tensors
        from megatron_revisual.models.qwen25_vl.rope_index import mrope_config
        from megatron_revisual.rl.advantages import grpo_advantages
        from megatron_revisual.rollout.engine import HFEngineConfig
        from megatron_revisual.rollout.registry import create_engine
        from megatron_revisual.rollout.types import SamplingConfig
        from megatron_revisual.train.grpo_step import (
            PolicySample,
            attach_log_probs,
            build_policy_batches,
            compute_log_probs,
            grpo_update,
        )

        model, optimizer, scheduler = self.policy or self._policy()
        engine = create_engine(HFEngineConfig(model_path=str(self.hf_dir), dtype=self.cfg.model.params_dtype
                                              .replace("bf16", "bfloat16").replace("fp32", "float32"),
                                              device=self.device.type, max_model_len=1024))
        n, steps = 4, []
        for step in range(2):
            engine.update_weights(stream_hf_tensors(model, self.cfg.model))
            batch = engine.generate(self._prompts(4), SamplingConfig(n=n, max_tokens=32, temperature=1.0, seed=step))
            samples = [s for s in batch.samples]
            diff = self._engine_vs_megatron(samples, model)
            # any reward that differs within a group will do: the share of even token ids
            rewards = torch.tensor([sum(t % 2 == 0 for t in s.token_ids) / max(1, len(s.token_ids)) for s in samples])
            adv = grpo_advantages(rewards, n)
            chosen = [PolicySample(prompt_ids=torch.tensor(s.prompt_token_ids), response_ids=torch.tensor(s.token_ids),
                                   advantage=float(a)) for s, a in zip(samples, adv, strict=True) if s.token_ids]
            batches = build_policy_batches(chosen, config=mrope_config(self.cfg.model), micro_batch_tokens=4096)
            batches = attach_log_probs(batches, old=compute_log_probs(model, batches))
            metrics = grpo_update(model, optimizer, batches, scheduler=scheduler)
            steps.append({"samples": len(samples), "logprob_diff_mean": diff, "loss": metrics["loss"],
                          "grad_norm": metrics["grad_norm"], "update_successful": metrics["update_successful"]})
        engine.close()
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        good = all(s["logprob_diff_mean"] <= tol and s["grad_norm"] > 0 and s["update_successful"] == 1.0
                   for s in steps)
        return {"status": "passed" if good else "failed", "steps": steps, "logprob_tolerance": tol}

    def vllm(self) -> dict:
        """The colocated rollout (`rollout.colocated`): an engine per rank (in the rank's process
        on GPUs, vLLM's external_launcher; in a child process on CPU), or one engine of
        --rollout-tp ranks; generate, sleep, wake weights, sync, wake KV cache, generate."""
        if importlib.util.find_spec("vllm") is None:
            return {"status": "skipped: vllm missing"}
        import torch.distributed as dist

        from megatron_revisual.rollout.colocated import ColocatedRollout, Placement, start_engine
        from megatron_revisual.rollout.engine import VLLMEngineConfig
        from megatron_revisual.rollout.types import SamplingConfig

        model = self.policy[0] if self.policy else self._policy()[0]
        on_gpu = self.device.type == "cuda"
        placement = Placement(world_size=dist.get_world_size(), engine_tp=self.args.rollout_tp)
        config = VLLMEngineConfig(
            model_path=str(self.hf_dir), dtype="bfloat16" if self.dtype == torch.bfloat16 else "float32",
            max_model_len=1024, enforce_eager=True, gpu_memory_utilization=0.3, enable_sleep_mode=on_gpu,
            cpu_kv_cache_gib=None if on_gpu else 1.0)
        rollout = ColocatedRollout(placement, lambda: start_engine(placement, config, rank=dist.get_rank()),
                                   rank=dist.get_rank())
        sampling = SamplingConfig(n=2, max_tokens=32, temperature=1.0, seed=0)
        prompts = self._prompts(2 * placement.num_engines)
        first = rollout.generate(prompts, sampling)
        rollout.sleep()
        self.sync()
        t0 = time.perf_counter()
        report = rollout.sync_model(model, self.cfg.model, bucket_bytes=512 << 20)
        self.sync()
        sync_s = time.perf_counter() - t0
        second = rollout.generate(prompts, sampling)
        diff = self._engine_vs_megatron(second.samples, model)
        slept = rollout.engine.capabilities.sleep
        history = rollout.cycle.history
        rollout.close()
        alive = torch.ones(1, device=self.device)
        dist.all_reduce(alive)  # the trainer's world outlives the engines
        # A new engine in the same process after the first closed (a run whose next GRPO stage
        # needs other engine settings): on GPUs vLLM asserts its sleep-mode allocator holds
        # nothing before it loads weights, so a tensor the first engine left behind fails here.
        # Same weights after the sync, same seeds: the same samples.
        t0 = time.perf_counter()
        again = ColocatedRollout(placement, lambda: start_engine(placement, config, rank=dist.get_rank()),
                                 rank=dist.get_rank())
        restart_s = time.perf_counter() - t0
        again.sleep()
        again.sync_model(model, self.cfg.model, bucket_bytes=512 << 20)
        third = again.generate(prompts, sampling)
        again.close()
        same = [s.token_ids for s in third.samples] == [s.token_ids for s in second.samples]
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        samples = 2 * 2 * placement.num_engines
        good = (len(first.samples) == len(second.samples) == samples and diff <= tol and (slept or not on_gpu)
                and history[-3:] == [("awake", "asleep"), ("asleep", "weights"),
                                                               ("weights", "awake")]
                and int(alive) == dist.get_world_size() and same)
        return {"status": "passed" if good else "failed", "engines": placement.num_engines,
                "engine_tp": placement.engine_tp, "sleep_mode": slept, "history": history,
                "sync_seconds": sync_s, "sync_gib_per_rank": report.bytes_to_engine / 2**30,
                "logprob_diff_mean_after_sync": diff, "tolerance": tol,
                "restart_seconds": restart_s, "restart_same_samples": same}

    def te_fp8(self) -> dict:
        if importlib.util.find_spec("transformer_engine") is None:
            return {"status": "skipped: transformer_engine missing"}
        from megatron_revisual.data.packing import FP8_TOKEN_MULTIPLE
        from megatron_revisual.parallel.device import to_device

        recipe = self.args.fp8_recipe
        cfg = self.make_config(["model.layer_backend=transformer_engine", "precision.fp8=hybrid",
                                f"precision.fp8_recipe={recipe}"])
        model = self.build(cfg).train()
        seqs = self.sequences([self.args.seq // 2 + 3, self.args.seq // 4 + 5], seed=3)  # aligned to nothing
        p = to_device(self.packed(seqs, fp8_recipe=recipe))
        length = int(p.input_ids.shape[1])
        self.sync()
        start = time.perf_counter()
        loss = model(p.input_ids, p.position_ids, labels=p.labels, packed_seq_params=p.packed_seq_params)
        loss = (loss.float() * p.loss_mask).sum() / p.loss_mask.sum()
        loss.backward()
        self.sync()
        seconds = time.perf_counter() - start
        grads = [q.grad if q.grad is not None else getattr(q, "main_grad", None) for q in model.parameters()]
        finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        good = finite and torch.isfinite(loss) and length % FP8_TOKEN_MULTIPLE[recipe] == 0
        return {"status": "passed" if good else "failed", "recipe": recipe, "row_length": length,
                "real_tokens": sum(len(x) for x in seqs), "loss": float(loss), "grads_finite": finite,
                "fwd_bwd_tokens_per_s": length / seconds}

    def run(self) -> None:
        self.report("logits_vs_transformers", self.logits)
        self.report("sft_packed_steps", self.sft)
        self.report("checkpoint_async_roundtrip", self.checkpoint)
        self.report("grpo_steps", self.grpo)
        self.report("te_fp8", self.te_fp8)
        # last: an in-process vLLM engine takes over torch.distributed's default group and
        # destroys it when it closes
        self.report("vllm_generate_sleep_sync", self.vllm)


@dataclasses.dataclass(frozen=True)
class _Row:
    packed: object


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny fp32 model on CPU/gloo (what CI runs)")
    parser.add_argument("--layers", type=int, default=2, help="language and vision layers of the 7B-width model")
    parser.add_argument("--seq", type=int, default=None, help="tokens of the longest sequence (default 2048; tiny 64)")
    parser.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "tensorwise", "mxfp8", "blockwise"])
    parser.add_argument("--rollout-tp", type=int, default=1, help="ranks per vLLM engine (divides the world)")
    args = parser.parse_args(argv)
    args.seq = args.seq or (64 if args.tiny else 2048)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --tiny for the CPU version")
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)  # a plain `python` run is a world of 1; torchrun sets them

    import torch.distributed as dist

    from megatron_revisual.config import load_config
    from megatron_revisual.parallel import destroy_parallel, initialize_parallel
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    initialize_parallel(tp=1, pp=1)
    world = dist.get_world_size()
    # one directory for every rank (the same node: torchrun --nproc-per-node), written by rank 0
    box = [tempfile.mkdtemp(prefix="gpu_check-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    try:
        hf_dir = tmp / "model"
        if dist.get_rank() == 0:
            make_tiny_checkpoint(hf_dir, seed=0, spec=_spec(args.tiny, args.layers))
        dist.barrier()
        base = [f"model.hf_path={hf_dir}", f"model.params_dtype={'fp32' if args.tiny else 'bf16'}",
                "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
                "parallel.use_distributed_optimizer=true", f"cluster.devices_per_node={world}",
                f"cluster.backend={'gloo' if args.tiny else 'nccl'}", "optim.lr=1.0e-4", "optim.lr_warmup_steps=0",
                "optim.lr_decay_style=constant", "prepare.tiny_model=false", f"output_dir={tmp}/run"]
        checker = Checker(args, hf_dir, load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", base))
        checker.make_config = lambda extra: load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", base + extra)
        if dist.get_rank() == 0:
            print(json.dumps({"check": "setup", "status": "passed", "device": str(checker.device),
                              "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "world_size": world, "backend": dist.get_backend(), "torch": torch.__version__,
                              "layers": None if args.tiny else args.layers, "dtype": str(checker.dtype)}), flush=True)
        checker.run()
    finally:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
        if dist.is_initialized():
            dist.barrier()
            destroy_parallel()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if checker.failed else 0


if __name__ == "__main__":
    sys.exit(main())
