"""`revisual infer`: one image, one question, the ReVisual-R1 system prompt; prints each
response's reasoning and its boxed answer.

The released infer.py's flags work as they are (``--model_path --image_path --question --prompt
--max_tokens --do_sample --temperature --top_p --top_k --num_return_sequences``), and so does its
``--prompt``: appended to the question in the user turn (``question + prompt``, no separator),
with no system message unless --system-prompt is given too. ``--do_sample False`` is greedy.

Generation runs in-process with vLLM's offline ``LLM`` (engine core in this process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``), or with transformers' ``generate`` when vLLM is not
installed or ``--engine transformers`` is given. The sampling flags and defaults are those of
the released ``infer.py`` (temperature 1.0, top-p 0.95, top-k 50, 16384 new tokens);
``--temperature 0`` is greedy.

    # CPU, the tiny model:
    revisual make-tiny --out runs/tiny
    VLLM_CPU_KVCACHE_SPACE=1 revisual infer --model runs/tiny --image fig.png \\
        --question "Find x." --max-tokens 32 --max-model-len 1024 --dtype float32 --enforce-eager
    # GPU:
    revisual infer --model /ckpt/Revisual-R1-final --image fig.png --question "Find x." \\
        --num-return-sequences 4

Also runnable as ``python -m megatron_revisual.infer ...``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_revisual.evaluation.prompts import REVISUAL_SYSTEM_PROMPT
from megatron_revisual.rl.rewards import extract_answer
from megatron_revisual.serving import ModelDirError, check_model_dir

__all__ = [
    "InferResponse",
    "add_infer_arguments",
    "chat_messages",
    "format_responses",
    "generate",
    "run_infer",
    "split_response",
]

_THINK = re.compile(r"<\s*think\s*>(.*?)<\s*/\s*think\s*>", re.DOTALL)


@dataclass(frozen=True, kw_only=True)
class InferResponse:
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    max_tokens: int = 16384
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 50  # 0: off
    n: int = 1
    seed: int | None = 0


def split_response(text: str) -> tuple[str, str | None]:
    """(reasoning, final answer): the reasoning is the ``<think>`` content if there is one,
    else the text before the last ``\\boxed``; the answer as the reward's extraction finds it."""
    match = _THINK.search(text)
    if match:
        reasoning = match.group(1)
    else:
        cut = text.rfind("\\boxed")
        reasoning = text[:cut] if cut >= 0 else text
    return reasoning.strip(), extract_answer(text)


def format_responses(responses: list[InferResponse]) -> str:
    """The printed form: one block per response, reasoning then answer."""
    blocks = []
    for i, response in enumerate(responses, start=1):
        reasoning, answer = split_response(response.text)
        finish = f" (finish: {response.finish_reason})" if response.finish_reason else ""
        blocks.append(
            f"=== response {i}/{len(responses)}{finish} ===\n"
            f"--- reasoning ---\n{reasoning}\n"
            f"--- answer ---\n{answer if answer is not None else '(no boxed answer found)'}\n"
        )
    return "\n".join(blocks)


def chat_messages(question: str, image_part: dict, *, system_prompt: str, prompt: str = "") -> list[dict]:
    """The chat: the system prompt (left out if empty), then the user turn: the image, then
    `question + prompt` (how the released infer.py adds its --prompt)."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append(
        {"role": "user", "content": [image_part, {"type": "text", "text": question + prompt}]}
    )
    return messages


def _generate_vllm(
    model_dir: Path,
    image: Any,
    chat: Any,
    sampling: SamplingSettings,
    *,
    dtype: str,
    max_model_len: int | None,
    enforce_eager: bool,
    tensor_parallel_size: int,
) -> list[InferResponse]:
    # Before vLLM is imported: keep the engine core in this process (no spawned engine).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir),
        dtype=dtype,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        tensor_parallel_size=tensor_parallel_size,
        seed=sampling.seed,
        limit_mm_per_prompt={"image": 1, "video": 0},
    )
    params = SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
    )
    (out,) = llm.chat(chat({"type": "image_pil", "image_pil": image}), params, use_tqdm=False)
    return [InferResponse(text=o.text, finish_reason=o.finish_reason) for o in out.outputs]


def _generate_transformers(
    model_dir: Path,
    image: Any,
    chat: Any,
    sampling: SamplingSettings,
    *,
    dtype: str,
) -> list[InferResponse]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    text = processor.apply_chat_template(
        chat({"type": "image"}), add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    greedy = sampling.temperature == 0
    kwargs: dict[str, Any] = {"do_sample": not greedy}
    if not greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=sampling.max_tokens,
            # transformers refuses several greedy sequences; they would all be the same one
            num_return_sequences=1 if greedy else sampling.n,
            **kwargs,
        )
    if greedy:
        out = out.repeat(sampling.n, 1)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    eos_ids = model.generation_config.eos_token_id
    eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    responses = []
    for row in new_tokens.tolist():
        finish = "stop" if any(t in eos for t in row) else "length"
        text = processor.tokenizer.decode(row, skip_special_tokens=True)
        responses.append(InferResponse(text=text, finish_reason=finish))
    return responses


def generate(
    model_dir: str | Path,
    image_path: str | Path,
    question: str,
    *,
    system_prompt: str | None = None,
    prompt: str = "",
    sampling: SamplingSettings | None = None,
    engine: str = "auto",
    dtype: str = "auto",
    max_model_len: int | None = None,
    enforce_eager: bool = False,
    tensor_parallel_size: int = 1,
) -> list[InferResponse]:
    """``sampling.n`` responses to one image + question (engine: auto, vllm or transformers).
    `prompt` is appended to the question; `system_prompt` None means the ReVisual-R1 one,
    or none at all when a `prompt` is given (the released infer.py's behaviour)."""
    from functools import partial

    from PIL import Image

    sampling = sampling or SamplingSettings()
    if sampling.n < 1 or sampling.max_tokens < 1:
        raise ValueError(
            f"--num-return-sequences {sampling.n} and --max-tokens {sampling.max_tokens} must be >= 1"
        )
    path = check_model_dir(model_dir)
    image_path = Path(image_path)
    if not image_path.is_file():
        raise FileNotFoundError(f"--image {image_path}: no such file")
    image = Image.open(image_path).convert("RGB")
    if system_prompt is None:
        system_prompt = "" if prompt else REVISUAL_SYSTEM_PROMPT
    chat = partial(chat_messages, question, system_prompt=system_prompt, prompt=prompt)
    if engine == "auto":
        engine = "vllm" if importlib.util.find_spec("vllm") else "transformers"
    if engine == "vllm":
        return _generate_vllm(
            path,
            image,
            chat,
            sampling,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
        )
    if engine == "transformers":
        for flag, value, default in (
            ("--max-model-len", max_model_len, None),
            ("--enforce-eager", enforce_eager, False),
            ("--tensor-parallel-size", tensor_parallel_size, 1),
        ):
            if value != default:
                raise ValueError(f"{flag} applies to the vLLM engine only, not to transformers")
        return _generate_transformers(path, image, chat, sampling, dtype=dtype)
    raise ValueError(f"--engine must be auto, vllm or transformers, got {engine!r}")


def _yes_no(text: str) -> bool:
    """"True" / "False" as the released inference.sh passes them (its argparse `type=bool`
    reads "False" as true; here it means false)."""
    value = text.strip().casefold()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not True or False")


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `revisual infer`: the released infer.py's, dash-separated, each also under
    its released underscore name (``--model_path``, ``--max_tokens``, ...)."""
    p = parser
    p.add_argument("--model", "--model_path", dest="model", required=True, type=Path,
                   help="Hugging Face checkpoint directory")
    p.add_argument("--image", "--image_path", dest="image", required=True, type=Path,
                   help="image file")
    p.add_argument("--question", required=True, help="question text")
    p.add_argument("--prompt", default="",
                   help="text appended to the question (as the released infer.py does); "
                   "drops the default system prompt")
    p.add_argument("--system-prompt", default=None,
                   help="system message ('' for none; default: the ReVisual-R1 one, none with --prompt)")
    p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=16384,
                   help="maximum new tokens")
    p.add_argument("--do-sample", "--do_sample", dest="do_sample", type=_yes_no, default=None,
                   help="True / False; False is greedy decoding (as --temperature 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=0.95)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=50,
                   help="0 disables top-k")
    p.add_argument("--num-return-sequences", "--num_return_sequences", dest="num_return_sequences",
                   type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("auto", "vllm", "transformers"), default="auto")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM context length")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallelism")


def run_infer(args: argparse.Namespace) -> int:
    """`revisual infer`; prints the responses, returns 0 (2 for bad input)."""
    temperature = args.temperature
    if args.do_sample is False:
        temperature = 0.0
    elif args.do_sample and temperature == 0:
        print("revisual infer: error: --do_sample True needs --temperature > 0", file=sys.stderr)
        return 2
    sampling = SamplingSettings(
        max_tokens=args.max_tokens,
        temperature=temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        n=args.num_return_sequences,
        seed=args.seed,
    )
    try:
        responses = generate(
            args.model,
            args.image,
            args.question,
            system_prompt=args.system_prompt,
            prompt=args.prompt,
            sampling=sampling,
            engine=args.engine,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
            tensor_parallel_size=args.tensor_parallel_size,
        )
    except (ModelDirError, FileNotFoundError, ValueError) as e:
        print(f"revisual infer: error: {e}", file=sys.stderr)
        return 2
    print(format_responses(responses), end="", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="revisual infer", description=__doc__.split("\n\n")[0])
    add_infer_arguments(parser)
    return run_infer(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
