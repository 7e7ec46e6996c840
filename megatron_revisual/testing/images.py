"""Generated pictures for test inputs (no files shipped, nothing downloaded)."""

from __future__ import annotations

from typing import Any

__all__ = ["fixture_image"]


def fixture_image(seed: int, size: tuple[int, int] = (96, 72)) -> Any:
    """A deterministic RGB test picture (gradients plus seeded noise), width x height."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    arr[..., 2] = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    return Image.fromarray(arr)
