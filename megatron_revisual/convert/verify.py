"""Do a Megatron checkpoint and a Hugging Face directory compute the same model?

    revisual convert verify --hf hf/Qwen2.5-VL-7B --ckpt ckpt/7b --tp 2 --pp 2
    {"max_abs_logit_diff": 3.1e-06, "mean_abs_logit_diff": 2.2e-07, "cosine": 1.0, "top1_agreement": 1.0, ...}

Exit status 1 when the weights streamed back out of the checkpoint differ from the HF files
(`weights_match` false) or the logits differ by more than --max-diff (default 1e-3, fp32).

transformers runs the HF directory; our Megatron model, built at (tp, pp) whatever layout the
checkpoint was saved from, loads the checkpoint through dist_checkpointing (resharding) and runs
the same batch through Megatron's pipeline schedule. Both compute in fp32 (a bf16 checkpoint is
upcast on both sides, so differences are kernel order only). Logits are compared at the real
(non-padding) tokens of a fixed multimodal batch: two images of different sizes in one prompt,
a text-only prompt, and an image whose patch grid is not a multiple of the attention window;
or the given --prompt / --image inputs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Any

import torch

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.convert.dist_ckpt import (
    checkpoint_model_config,
    load_model_checkpoint,
    resolve_checkpoint_dir,
    run_config_for,
)
from megatron_revisual.convert.dist_io import launch
from megatron_revisual.convert.safetensors_io import ConvertError

BUILTIN_SAMPLES: list[tuple[str, list[tuple[int, int]]]] = [
    ("Compare the two figures.", [(84, 56), (168, 112)]),
    ("What is 3 + 4? Think step by step, then answer.", []),
    ("Describe the triangle.", [(196, 140)]),
]
DEFAULT_IMAGE_PROMPT = "Describe this image."


def _samples(prompts: list[str] | None, images: list[str] | None) -> list[tuple[str, list[Any]]]:
    """(prompt, PIL images) per sample: the built-in batch, or one sample per --prompt with the
    --image files attached in order, one per sample (extra images get a default prompt)."""
    from PIL import Image

    from megatron_revisual.demo import demo_image

    if not prompts and not images:
        return [(p, [demo_image(w, h) for w, h in sizes]) for p, sizes in BUILTIN_SAMPLES]
    prompts, images = list(prompts or []), list(images or [])
    prompts += [DEFAULT_IMAGE_PROMPT] * max(0, len(images) - len(prompts))
    out = []
    for i, prompt in enumerate(prompts):
        pics = []
        if i < len(images):
            try:
                pics = [Image.open(images[i]).convert("RGB")]
            except OSError as e:
                raise ConvertError(f"{images[i]}: cannot read the image: {e}") from None
        out.append((prompt, pics))
    return out


def build_batch(
    hf_dir: Path, model_cfg: ModelConfig, samples: list[tuple[str, list[Any]]]
) -> dict[str, torch.Tensor]:
    """Processor outputs for `samples` (right-padded), the way transformers takes them."""
    from transformers import AutoProcessor, AutoTokenizer

    if model_cfg.vision is None:
        if any(pics for _, pics in samples):
            raise ConvertError(f"{hf_dir}: a text-only model cannot take --image inputs")
        tok = AutoTokenizer.from_pretrained(hf_dir)
        tok.padding_side = "right"
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p, _ in samples
        ]
        return dict(tok(texts, padding=True, return_tensors="pt"))
    proc = AutoProcessor.from_pretrained(hf_dir)
    proc.tokenizer.padding_side = "right"
    texts, images = [], []
    for prompt, pics in samples:
        content = [{"type": "image"} for _ in pics] + [{"type": "text", "text": prompt}]
        texts.append(
            proc.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        )
        images += pics
    return dict(proc(text=texts, images=images or None, padding=True, return_tensors="pt"))


def hf_logits(
    hf_dir: Path, model_cfg: ModelConfig, inputs: dict[str, torch.Tensor]
) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if model_cfg.vision is None else AutoModelForImageTextToText
    model = auto.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        # mm_token_type_ids (from the processor) is what gives image tokens their M-RoPE positions.
        logits = model(**inputs).logits.float()
    del model
    gc.collect()
    return logits


def megatron_batch(
    model_cfg: ModelConfig, inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor | None]:
    from megatron_revisual.models.registry import model_family

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = model_family(model_cfg).position_ids(model_cfg, ids, inputs.get("image_grid_thw"), mask)
    return {
        "input_ids": ids,
        "position_ids": positions,
        "pixel_values": inputs.get("pixel_values"),
        "image_grid_thw": inputs.get("image_grid_thw"),
    }


def _megatron_logits_rank(
    model_cfg: ModelConfig, ckpt_dir: str, batch: dict, hf_dir: str, first_stage_layers: int | None = None
) -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_revisual.models.registry import model_family

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    cfg = run_config_for(dataclasses.replace(model_cfg, params_dtype="fp32"), tp, pp, first_stage_layers)
    model = model_family(cfg.model).build(
        cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    load_model_checkpoint(model, ckpt_dir)
    model.eval()
    b, s = batch["input_ids"].shape

    def forward_step(data_iterator, m):  # noqa: ANN001, ANN202 (Megatron's callback)
        x = next(data_iterator)
        out = m(
            x["input_ids"],
            x["position_ids"],
            pixel_values=x["pixel_values"],
            image_grid_thw=x["image_grid_thw"],
        )

        def loss_func(output):  # noqa: ANN001, ANN202
            return output.sum() * 0, {
                "logits": gather_from_tensor_model_parallel_region(output).detach()
            }

        return out, loss_func

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    result = exported_weights_match(model, model_cfg, hf_dir)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        result["logits"] = out[0]["logits"][..., : model_cfg.vocab_size].float()
    return result


def exported_weights_match(
    model: torch.nn.Module, model_cfg: ModelConfig, hf_dir: str
) -> dict[str, Any]:
    """Stream the loaded model back out with `stream_hf_tensors` (the weight-sync path: TP
    gathers, PP broadcasts) and compare every tensor this rank receives with the HF file's,
    bitwise after casting to the file's dtype (the fp32 model holds exact upcasts)."""
    from megatron_revisual.convert.export import stream_hf_tensors
    from megatron_revisual.convert.safetensors_io import HFCheckpoint

    reader = HFCheckpoint(hf_dir)
    seen, mismatched = [], []
    for name, tensor in stream_hf_tensors(model, model_cfg):
        seen.append(name)
        if name not in reader.weight_map:
            mismatched.append(name)
            continue
        ref = reader.get(name)
        if tensor.shape != ref.shape or not torch.equal(tensor.detach().cpu().to(ref.dtype), ref):
            mismatched.append(name)
    expected = set(reader.names())
    if model_cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    exact = not mismatched and len(seen) == len(set(seen)) and set(seen) == expected
    return {"weights_match": exact, "hf_tensors": len(seen), "mismatched": mismatched[:5]}


def compare_logits(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    if ours.shape != ref.shape:
        raise ConvertError(
            f"logit shapes differ: Megatron {list(ours.shape)}, HF {list(ref.shape)}"
        )
    a, b = ours[mask].double(), ref[mask].double()
    diff = (a - b).abs()
    return {
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "cosine": torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0).item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).double().mean().item(),
    }


def verify(
    hf_dir: str | Path,
    ckpt_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    first_stage_layers: int | None = None,
    prompts: list[str] | None = None,
    images: list[str] | None = None,
) -> dict[str, Any]:
    """Compare the logits of `hf_dir` (transformers) and `ckpt_dir` (Megatron at tp, pp, with
    `first_stage_layers` on the first stage; default: even, or `default_first_stage_layers`)."""
    from megatron_revisual.convert.dist_io import DistCheckpointReader
    from megatron_revisual.convert.safetensors_io import HFCheckpoint

    hf_dir = Path(hf_dir).resolve()
    ckpt = resolve_checkpoint_dir(ckpt_dir)
    # Both sides' files first: a truncated .safetensors or a missing .distcp is a ConvertError
    # naming the file, not a traceback from transformers or torch.distributed.checkpoint.
    HFCheckpoint(hf_dir)
    DistCheckpointReader(ckpt)
    # The checkpoint's stored config, which must agree with hf_dir's config.json.
    model_cfg, _ = checkpoint_model_config(ckpt, hf_dir)
    run_config_for(model_cfg, tp, pp, first_stage_layers)  # layout errors before any work
    inputs = build_batch(hf_dir, model_cfg, _samples(prompts, images))
    ref = hf_logits(hf_dir, model_cfg, inputs)
    batch = megatron_batch(model_cfg, inputs)
    results = launch(
        _megatron_logits_rank, tp=tp, pp=pp,
        args=(model_cfg, str(ckpt), batch, str(hf_dir), first_stage_layers)
    )
    ours = next(r["logits"] for r in results if "logits" in r)
    report = compare_logits(ours, ref, inputs["attention_mask"].bool())
    # Every rank must have received every HF tensor intact (what weight sync relies on).
    report["weights_match"] = all(r["weights_match"] for r in results)
    report["hf_tensors"] = results[0]["hf_tensors"]
    mismatched = sorted({n for r in results for n in r["mismatched"]})
    if mismatched:
        report["mismatched"] = mismatched[:5]
    report.update(
        tokens=int(inputs["attention_mask"].sum()),
        samples=int(inputs["input_ids"].shape[0]),
        tp=tp,
        pp=pp,
    )
    return report


def failures(report: dict[str, Any], max_diff: float) -> list[str]:
    """Why a verify report is a failure (empty when the checkpoint matches). Both sides compute
    in fp32, so kernel-order differences stay far below the CLI's default max_diff of 1e-3."""
    out = []
    if not report["weights_match"]:
        names = ", ".join(report.get("mismatched", [])) or "a tensor is missing or repeated"
        out.append(f"the exported weights differ from the HF files ({names})")
    if not report["max_abs_logit_diff"] <= max_diff:  # NaN fails too
        out.append(
            f"max_abs_logit_diff {report['max_abs_logit_diff']:.3g} exceeds --max-diff {max_diff:g}"
        )
    return out


def format_report(report: dict[str, Any]) -> str:
    return json.dumps(report, sort_keys=False)
