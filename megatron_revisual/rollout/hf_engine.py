"""The Hugging Face transformers rollout engine: the reference the vLLM engine is checked
against, and the fallback where vLLM is not installed.

    engine = HFEngine(HFEngineConfig(model_path="runs/tiny", dtype="float32", max_model_len=1024))

One ``generate`` call per request (its n samples batched), with ``output_logits`` for raw
log-probs. Weight updates take the same HF checkpoint names as vLLM; transformers 5 keeps
other names in memory (``model.language_model.*``, ``model.visual.*`` for Qwen2.5-VL), and the
translation is transformers' own (``revert_weight_conversion``), not a table of ours.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from megatron_revisual.rollout.engine import (
    HFEngineConfig,
    PreparedRequest,
    PromptPreparer,
    RolloutEngine,
    SyncMeter,
    bucketed,
)
from megatron_revisual.rollout.types import (
    DEFAULT_BUCKET_BYTES,
    EngineCapabilities,
    RolloutBatch,
    RolloutEngineError,
    RolloutRequest,
    RolloutSample,
    SamplingConfig,
    WeightSyncStats,
)

__all__ = ["HFEngine", "checkpoint_parameter_names"]

log = logging.getLogger(__name__)


def checkpoint_parameter_names(model: torch.nn.Module) -> dict[str, str]:
    """HF checkpoint name -> in-memory parameter name, as ``save_pretrained`` would rename them.

    Tied parameters appear once (under the name ``named_parameters`` keeps)."""
    from transformers.core_model_loading import revert_weight_conversion

    # Distinct empty placeholders: a pure renaming passes each object through unchanged, so
    # identity tells which in-memory name became which checkpoint name.
    placeholders = {name: torch.empty(0) for name, _ in model.named_parameters()}
    owner = {id(t): name for name, t in placeholders.items()}
    renamed = revert_weight_conversion(model, dict(placeholders))
    mapping = {}
    for ckpt_name, tensor in renamed.items():
        if id(tensor) not in owner:
            raise NotImplementedError(
                f"{type(model).__name__}: checkpoint tensor {ckpt_name} is not a plain renaming of "
                "one parameter (a transformers weight converter); the HF engine cannot stream it"
            )
        mapping[ckpt_name] = owner[id(tensor)]
    return mapping


class HFEngine(RolloutEngine):
    def __init__(self, config: HFEngineConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

        self.config = config
        self.preparer = PromptPreparer(
            config.model_path,
            prompt_limit=config.prompt_limit,
            max_images=config.max_images_per_prompt,
        )
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        auto = AutoModelForImageTextToText if self.preparer.vision else AutoModelForCausalLM
        self.model = (
            auto.from_pretrained(config.model_path, dtype=config.torch_dtype).to(self.device).eval()
        )
        self._params = dict(self.model.named_parameters())
        self._names = checkpoint_parameter_names(self.model)
        self._tied = bool(
            getattr(self.model.config.get_text_config(), "tie_word_embeddings", False)
        )
        defaults = self.model.generation_config
        eos = defaults.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._pad = defaults.pad_token_id
        self._generation_config = GenerationConfig(
            eos_token_id=defaults.eos_token_id,
            pad_token_id=defaults.pad_token_id,
            bos_token_id=defaults.bos_token_id,
        )
        on_gpu = self.device.type == "cuda"
        self.capabilities = EngineCapabilities(
            name="transformers",
            sleep=on_gpu,
            sleep_note="moves the model to host memory and back"
            if on_gpu
            else "the model already lives in host memory",
            weight_sync=True,
            weight_sync_note="copies into the model's parameters by checkpoint name",
            tensor_parallel_size=1,
        )
        self._offloaded = False

    # -- generation ---------------------------------------------------------------------------

    def _inputs(self, p: PreparedRequest) -> dict[str, torch.Tensor]:
        if self.preparer.vision:
            inputs = self.preparer.processor(
                text=[p.prompt], images=p.images or None, return_tensors="pt"
            )
        else:
            inputs = self.preparer.tokenizer(
                [p.prompt], return_tensors="pt", add_special_tokens=False
            )
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _generate_one(self, p: PreparedRequest, sampling: SamplingConfig) -> list[RolloutSample]:
        inputs = self._inputs(p)
        greedy = sampling.temperature == 0
        kwargs: dict[str, Any] = {
            # Only SamplingConfig decides: a checkpoint's generation_config.json (Qwen's sets
            # top_k, top_p, repetition_penalty) must not change what is sampled, as in vLLM.
            "generation_config": self._generation_config,
            "max_new_tokens": sampling.max_tokens,
            "do_sample": not greedy,
            # transformers refuses several greedy sequences; they would all be the same anyway
            "num_return_sequences": 1 if greedy else sampling.n,
            "output_logits": True,
            "return_dict_in_generate": True,
            "pad_token_id": self._pad,
        }
        if not greedy:
            # Explicit off-values: transformers' GenerationConfig defaults to top_k=50.
            kwargs.update(
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k
            )
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.preparer.tokenizer)
        suppressed = self.preparer.suppressed(sampling)
        if suppressed:
            kwargs["suppress_tokens"] = suppressed
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type), torch.no_grad():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed + p.seed_index * sampling.n)
            out = self.model.generate(**inputs, **kwargs)
        prompt_ids = inputs["input_ids"][0].tolist()
        new_tokens = out.sequences[:, len(prompt_ids) :].tolist()
        samples = []
        for j in range(sampling.n):
            row = 0 if greedy else j
            token_ids, text, finish, reason = self._finish(new_tokens[row], sampling.stop)
            logprobs = [
                torch.log_softmax(out.logits[k][row].float(), dim=-1)[t].item()
                for k, t in enumerate(token_ids)
            ]
            samples.append(
                RolloutSample(
                    request_index=p.index,
                    sample_index=j,
                    prompt_token_ids=prompt_ids,
                    token_ids=token_ids,
                    logprobs=logprobs,
                    text=text,
                    finish_reason=finish,
                    stop_reason=reason,
                )
            )
        return samples

    def _finish(
        self, tokens: list[int], stop: tuple[str, ...]
    ) -> tuple[list[int], str, str, int | str | None]:
        """Cut a generated row where generation ended for it (vLLM's conventions: the EOS or
        stop-completing token is kept, the text ends before the stop string)."""
        decode = self.preparer.tokenizer.decode
        cut, finish, reason = len(tokens), "length", None
        for k, t in enumerate(tokens):
            if t in self._eos:
                cut, finish = k + 1, "stop"
                reason = None if t == self.preparer.tokenizer.eos_token_id else t
                break
        if stop:
            for k in range(1, cut + 1):
                text = decode(tokens[:k], skip_special_tokens=True)
                hits = [(text.find(s), s) for s in stop if s in text]
                if hits:
                    at, s = min(hits)
                    return tokens[:k], text[:at], "stop", s
        return tokens[:cut], decode(tokens[:cut], skip_special_tokens=True), finish, reason

    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingConfig
    ) -> RolloutBatch:
        if self._offloaded:
            raise RolloutEngineError(
                "transformers engine is offloaded; call restore_memory() first"
            )
        start = time.perf_counter()
        prepared, skipped = self.preparer.prepare(requests)
        samples: list[RolloutSample] = []
        for p in prepared:
            if p.prompt_tokens + sampling.max_tokens > self.config.max_model_len:
                # vLLM stops such a request at max_model_len; do the same here.
                sampling_p = dataclasses.replace(
                    sampling, max_tokens=self.config.max_model_len - p.prompt_tokens
                )
            else:
                sampling_p = sampling
            try:
                samples.extend(self._generate_one(p, sampling_p))
            except Exception as e:
                raise RolloutEngineError(
                    f"transformers engine failed on request {p.index}: {type(e).__name__}: {e}"
                ) from e
        return RolloutBatch(samples=samples, skipped=skipped, seconds=time.perf_counter() - start)

    # -- weights ------------------------------------------------------------------------------

    def update_weights(
        self,
        stream: Iterable[tuple[str, torch.Tensor]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> WeightSyncStats:
        if self._offloaded:
            raise RolloutEngineError(
                "transformers engine is offloaded; call restore_memory() first"
            )
        meter = SyncMeter()
        loaded: set[str] = set()
        start = time.perf_counter()
        with torch.no_grad():
            for bucket in bucketed(
                stream, bucket_bytes, dtype=self.config.torch_dtype, device=self.device, meter=meter
            ):
                for name, tensor in bucket:
                    if name == "lm_head.weight" and self._tied and name not in self._names:
                        continue  # the tied output layer is the embedding, which the stream carries
                    target = self._names.get(name)
                    if target is None:
                        example = next(iter(self._names))
                        raise RolloutEngineError(
                            f"transformers engine: weight {name!r} is not a tensor of this "
                            f"{type(self.model).__name__} checkpoint (names look like {example!r})"
                        )
                    param = self._params[target]
                    if param.shape != tensor.shape:
                        raise RolloutEngineError(
                            f"transformers engine: weight {name!r} has shape {tuple(tensor.shape)}, "
                            f"the model's {target} is {tuple(param.shape)}"
                        )
                    param.copy_(tensor)
                    loaded.add(name)
        missing = sorted(set(self._names) - loaded)
        if missing:
            log.warning(
                "transformers engine: %d of %d weights were not in the stream and keep their old "
                "values, e.g. %s",
                len(missing),
                len(self._names),
                missing[:3],
            )
        return meter.stats(time.perf_counter() - start)

    # -- memory -------------------------------------------------------------------------------

    def free_memory(self) -> bool:
        if not self.capabilities.sleep:
            return super().free_memory()
        self.model.to("cpu")
        torch.cuda.empty_cache()
        self._offloaded = True
        return True

    def restore_memory(self, *, kv_cache: bool = True) -> bool:
        if not self._offloaded:
            return False
        self.model.to(self.device)
        self._offloaded = False
        return True

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._params = {}
