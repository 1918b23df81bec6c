"""Side-by-side comparison grids: rows = prompts, columns = runs (reference, quantized, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imageio import write_png

__all__ = ["Grid", "comparison_grid"]

PAD = 4
LABEL = 14  # pixels of text above each column and left of each row


@dataclass
class Grid:
    image: np.ndarray  # [H, W, 3] uint8

    def save_png(self, path: str | Path) -> Path:
        return write_png(path, self.image)


def comparison_grid(rows: list[tuple[str, list[np.ndarray]]], columns: list[str], tile: int | None = None) -> Grid:
    """A white-background grid: one row per ``(label, images)`` with one image per column, every image resized to
    ``tile`` pixels square (default: the first image's height), column titles on top, row labels on the left."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("comparison_grid: no rows")
    for label, images in rows:
        if len(images) != len(columns):
            raise ValueError(f"comparison_grid: row {label!r} has {len(images)} images for {len(columns)} columns")
    tile = tile or int(rows[0][1][0].shape[0])
    label_w = 8 * max(len(label) for label, _ in rows) + PAD
    width = label_w + len(columns) * (tile + PAD) + PAD
    height = LABEL + len(rows) * (tile + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        draw.text((label_w + c * (tile + PAD) + PAD, 1), title, fill="black")
    for r, (label, images) in enumerate(rows):
        y = LABEL + r * (tile + PAD) + PAD
        draw.text((PAD, y + tile // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            tile_image = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((tile, tile))
            canvas.paste(tile_image, (label_w + c * (tile + PAD) + PAD, y))
    return Grid(np.asarray(canvas))
