"""Synthetic, learnable data for the tiny CPU demo: small arithmetic and rendered images whose
answer must be counted or read. Everything is drawn from a seed: the same seed writes the same
rows and the same image bytes.

    paths = write_demo_datasets("runs/demo/data", seed=0)
    # {"sft": sft.jsonl, "mrl": mrl.parquet, "mrl_val": mrl_val.parquet,
    #  "trl": trl.jsonl, "trl_val": trl_val.jsonl}

Rows use the released ReVisual-R1 keys (`problem`, `answer`, `images`) plus `response`, a short
`<think>` trace ending in `\\boxed{answer}` for SFT, so `DatasetSpec`'s defaults read them.
Parquet files store images as {"bytes", "path"} structs (the `datasets` Image layout); jsonl
files name PNG files relative to themselves. Prompts are a dozen tokens with the tiny
tokenizer, and images are 56x56 by default: 4 vision tokens after the 2x2 merge, the tiny
processor's minimum size.

Tasks: `dots` (1 to max_dots equal black dots on white, in distinct cells of a 3x3 grid, so the
count is the dark area over one dot's area: learnable from pooled patch features), `digit`
(a seven-segment digit, slightly shifted), `colour` (a coloured shape, named candidates) and
`side` (a coloured shape in the left or right half). `count_dots`, `read_digit`, `read_colour`
and `read_side` read the answer back from the pixels (tests check the data with them).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "SIDES",
    "arithmetic_rows",
    "count_dots",
    "image_rows",
    "read_colour",
    "read_digit",
    "read_side",
    "render_digit",
    "render_dots",
    "render_shape",
    "text_choice_rows",
    "write_demo_datasets",
    "write_rows",
]

# Seven-segment layout: which segments each digit lights (a top, b upper right, c lower right,
# d bottom, e lower left, f upper left, g middle).
_DIGIT_SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


def _response(trace: str, answer: str) -> str:
    return f"<think>\n{trace}\n</think>\nThe answer is \\boxed{{{answer}}}."


def arithmetic_rows(n: int, *, seed: int, max_operand: int = 9,
                    ops: Sequence[str] = ("+", "-")) -> list[dict[str, Any]]:
    """`n` problems "What is a op b?" with operands in [0, max_operand]; "-" never goes below 0."""
    rng = random.Random(f"arithmetic:{seed}")
    rows = []
    for _ in range(n):
        op = rng.choice(list(ops))
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and b > a:
            a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        expr = f"{a} {op} {b}"
        rows.append({
            "problem": f"What is {expr}?",
            "answer": str(value),
            "response": _response(f"{expr} = {value}", str(value)),
        })
    return rows


def text_choice_rows(n: int, *, seed: int, digits: Sequence[int] = tuple(range(10))) -> list[dict[str, Any]]:
    """`n` text questions shaped like the digit task's: a digit written first (the evidence),
    then "Which digit is shown in the text: a or b?" naming it and one other digit. A cold start
    on these answers an image question of the same shape with one of its named candidates."""
    rng = random.Random(f"text_choice:{seed}")
    rows = []
    for _ in range(n):
        value = rng.choice(list(digits))
        names = _named(value, digits, 2, rng)
        rows.append({
            "problem": f"{value}\nWhich digit is shown in the text: {' or '.join(names)}?",
            "answer": str(value),
            "response": _response(f"The text shows {value}.", str(value)),
        })
    return rows


def render_dots(count: int, rng: random.Random, *, size: int = 56) -> Image.Image:
    """`count` (1..9) black dots of one size, each in its own cell of a 3x3 grid."""
    if not 1 <= count <= 9:
        raise ValueError(f"count={count} must be in 1..9")
    cell = size / 3
    radius = max(2, round(size * 0.09))
    slack = max(0, int(cell / 2 - radius - 1))  # keeps dots inside their cells, never touching
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for c in rng.sample(range(9), count):
        cx = cell * (c % 3 + 0.5) + rng.randint(-slack, slack)
        cy = cell * (c // 3 + 0.5) + rng.randint(-slack, slack)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill="black")
    return image


def _segment_boxes(size: int, dx: int, dy: int) -> dict[str, tuple[int, int, int, int]]:
    t = max(2, size // 9)  # stroke thickness
    x0, x1 = size // 4 + dx, size - size // 4 + dx
    y0, y1 = size // 7 + dy, size - size // 7 + dy
    ym = (y0 + y1) // 2
    return {
        "a": (x0, y0, x1, y0 + t), "d": (x0, y1 - t, x1, y1), "g": (x0, ym - t // 2, x1, ym + t - t // 2),
        "f": (x0, y0, x0 + t, ym), "b": (x1 - t, y0, x1, ym),
        "e": (x0, ym, x0 + t, y1), "c": (x1 - t, ym, x1, y1),
    }


def render_digit(digit: int, rng: random.Random, *, size: int = 56) -> Image.Image:
    """A seven-segment `digit`, shifted by at most size // 28 pixels (less than half a stroke, so
    `read_digit` still finds every segment at its nominal centre)."""
    shift = size // 28
    dx, dy = rng.randint(-shift, shift), rng.randint(-shift, shift)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for name, box in _segment_boxes(size, dx, dy).items():
        if name in _DIGIT_SEGMENTS[digit]:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill="black")
    return image


COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30),
    "purple": (140, 50, 170), "orange": (240, 140, 20),
}
SIDES = ("left", "right")


def render_shape(colour: str, rng: random.Random, *, size: int = 56, side: str | None = None) -> Image.Image:
    """A filled ellipse or rectangle of `colour` (a `COLOURS` name), random in size and place;
    with `side` ("left" or "right") it lies wholly in that half of the image."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    h = rng.randint(size // 3, size * 3 // 4)
    if side is None:
        w = rng.randint(size // 3, size * 3 // 4)
        x = rng.randint(0, size - w)
    elif side in SIDES:
        w = rng.randint(size // 4, size // 2 - 2)
        x = rng.randint(0, size // 2 - w) + (size // 2 if side == "right" else 0)
    else:
        raise ValueError(f"side={side!r}; use one of {SIDES}")
    y = rng.randint(0, size - h)
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape((x, y, x + w - 1, y + h - 1), fill=COLOURS[colour])
    return image


def read_colour(image: Image.Image) -> str:
    """The `COLOURS` name nearest to the mean of the image's non-white pixels."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float64)
    mean = pixels[_ink(image)].mean(axis=0)
    return min(COLOURS, key=lambda name: float(((mean - np.array(COLOURS[name])) ** 2).sum()))


def read_side(image: Image.Image) -> str | None:
    """"left" or "right" when all the image's non-white pixels lie in that half, else None."""
    ink = _ink(image)
    half = ink.shape[1] // 2
    left, right = bool(ink[:, :half].any()), bool(ink[:, half:].any())
    return "left" if left and not right else "right" if right and not left else None


def _ink(image: Image.Image) -> np.ndarray:
    """The (H, W) mask of the pixels that are not white: a shape of any colour."""
    return np.asarray(image.convert("RGB")).min(axis=2) < 200


def _dark(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")) < 128


def count_dots(image: Image.Image) -> int:
    """Connected dark regions (4-neighbourhood): the number of dots `render_dots` drew."""
    dark = _dark(image)
    seen = np.zeros_like(dark)
    h, w = dark.shape
    regions = 0
    for y, x in zip(*np.nonzero(dark), strict=True):
        if seen[y, x]:
            continue
        regions += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < h and 0 <= nx < w and dark[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return regions


def read_digit(image: Image.Image) -> int:
    """The digit whose lit segments match the pixels at the unshifted segment centres."""
    dark = _dark(image)
    lit = "".join(
        name for name, (x0, y0, x1, y1) in sorted(_segment_boxes(dark.shape[1], 0, 0).items())
        if dark[(y0 + y1) // 2, (x0 + x1) // 2]
    )
    for digit, segments in _DIGIT_SEGMENTS.items():
        if "".join(sorted(segments)) == lit:
            return digit
    raise ValueError(f"lit segments {lit!r} are no digit")


def image_rows(n: int, *, seed: int, task: str = "dots", size: int = 56, max_dots: int = 4,
               digits: Sequence[int] = tuple(range(10)), options: int | None = None) -> list[dict[str, Any]]:
    """`n` image questions; `images` holds one PIL image per row. Digit questions name candidates
    (in random order, as a multiple-choice benchmark does): `options` of them, the answer and
    others from `digits`; by default all of `digits` when they are at most 4, else none."""
    rng = random.Random(f"{task}:{seed}")
    rows = []
    choices = {"colour": len(COLOURS), "side": len(SIDES)}.get(task, len(digits))
    if options is not None and not 2 <= options <= choices:
        raise ValueError(f"options={options} must be in 2..{choices} (the {task} task's answers)")
    for _ in range(n):
        if task == "dots":
            value = rng.randint(1, max_dots)
            image = render_dots(value, rng, size=size)
            question, trace = "How many dots are in the image?", f"I count {value} dot{'s' if value > 1 else ''}."
        elif task == "digit":
            value = rng.choice(list(digits))
            image = render_digit(value, rng, size=size)
            question, trace = "What digit is shown in the image?", f"The image shows {value}."
            named = options if options is not None else (len(digits) if len(digits) <= 4 else 0)
            if named:
                question = f"Which digit is shown in the image: {' or '.join(_named(value, digits, named, rng))}?"
        elif task == "colour":
            value = rng.choice(sorted(COLOURS))
            image = render_shape(value, rng, size=size)
            question = ("Which colour is the shape in the image: "
                        f"{' or '.join(_named(value, sorted(COLOURS), options or 2, rng))}?")
            trace = f"The image shows {value}."
        elif task == "side":
            value = rng.choice(SIDES)
            image = render_shape(rng.choice(sorted(COLOURS)), rng, size=size, side=value)
            question = f"Which side of the image is the shape on: {' or '.join(_named(value, SIDES, 2, rng))}?"
            trace = f"The image shows {value}."
        else:
            raise ValueError(f"task={task!r}; use 'dots', 'digit', 'colour' or 'side'")
        rows.append({
            "problem": f"<image>{question}",
            "answer": str(value),
            "response": _response(trace, str(value)),
            "images": [image],
        })
    return rows


def _named(value: Any, answers: Sequence[Any], k: int, rng: random.Random) -> list[str]:
    """`value` and k-1 other answers, in random order: the candidates a question names."""
    others = rng.sample([a for a in answers if a != value], k - 1)
    names = [str(a) for a in (value, *others)]
    rng.shuffle(names)
    return names


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write rows (text fields and an optional `images` list of PIL images) as .parquet
    (images as PNG bytes) or .jsonl (images as PNG files in a `<stem>_images/` folder beside
    it, named relative to the jsonl file). The same rows give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    has_images = any("images" in r for r in rows)
    if path.suffix == ".parquet":
        import datasets

        features = None
        out = [dict(r) for r in rows]
        if has_images:
            # the `datasets` Image layout ({"bytes", "path"} structs plus the feature metadata)
            for r in out:
                r["images"] = [{"bytes": _png(im), "path": None} for im in r.get("images", [])]
            features = datasets.Features(
                {k: datasets.Value("string") for k in out[0] if k != "images"}
                | {"images": datasets.List(datasets.Image())}
            )
        datasets.Dataset.from_list(out, features=features).to_parquet(str(path))
    elif path.suffix == ".jsonl":
        image_dir = path.parent / f"{path.stem}_images"
        with path.open("w", encoding="utf-8") as f:
            for i, r in enumerate(rows):
                r = dict(r)
                if r.get("images"):
                    image_dir.mkdir(exist_ok=True)
                    names = []
                    for k, im in enumerate(r["images"]):
                        name = f"{i:06d}_{k}.png"
                        (image_dir / name).write_bytes(_png(im))
                        names.append(f"{image_dir.name}/{name}")
                    r["images"] = names
                f.write(json.dumps(r, sort_keys=True) + "\n")
    else:
        raise ValueError(f"{path}: write .parquet or .jsonl")
    return path


def write_demo_datasets(out_dir: str | Path, *, seed: int = 0, n_sft: int = 256,
                        n_sft_images: int = 0, n_sft_text_choice: int = 0, n_sft_colours: int = 0,
                        n_sft_sides: int = 0,
                        n_mrl: int = 256, n_trl: int = 256, n_val: int = 32,
                        task: str = "dots", image_size: int = 56, max_dots: int = 4,
                        digits: Sequence[int] = tuple(range(10))) -> dict[str, Path]:
    """The tiny demo's datasets: SFT, MRL (image questions, parquet) and TRL (arithmetic,
    jsonl), with validation splits drawn from seeds of their own (the answer spaces are small,
    so a validation question may also be a training one: the demo measures learning, not
    generalisation).

    SFT: n_sft arithmetic traces, plus n_sft_images image rows of the MRL task itself, plus
    n_sft_text_choice `text_choice_rows`, plus n_sft_colours two-candidate questions about the
    colour of a shape and n_sft_sides about which half of the image it lies in (images that share
    nothing with digits or dots), shuffled together."""
    out = Path(out_dir)
    sft = arithmetic_rows(n_sft, seed=seed) + text_choice_rows(n_sft_text_choice, seed=seed)
    if n_sft_images:
        sft += image_rows(n_sft_images, seed=seed + 1_000, task=task, size=image_size, max_dots=max_dots,
                          digits=digits)
    if n_sft_colours:
        sft += image_rows(n_sft_colours, seed=seed + 2_000, task="colour", size=image_size, options=2)
    if n_sft_sides:
        sft += image_rows(n_sft_sides, seed=seed + 3_000, task="side", size=image_size)
    if len(sft) > n_sft:
        random.Random(f"mix:{seed}").shuffle(sft)
    return {
        "sft": write_rows(sft, out / "sft.jsonl"),
        "mrl": write_rows(
            image_rows(n_mrl, seed=seed, task=task, size=image_size, max_dots=max_dots, digits=digits),
            out / "mrl.parquet",
        ),
        "mrl_val": write_rows(
            image_rows(n_val, seed=seed + 10_000, task=task, size=image_size, max_dots=max_dots,
                       digits=digits),
            out / "mrl_val.parquet",
        ),
        "trl": write_rows(arithmetic_rows(n_trl, seed=seed + 1), out / "trl.jsonl"),
        "trl_val": write_rows(arithmetic_rows(n_val, seed=seed + 10_001), out / "trl_val.jsonl"),
    }
