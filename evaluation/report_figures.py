"""Figures of the diagnostics (PNG). Built on ``matplotlib.figure.Figure`` with the Agg canvas, so no display and
no global pyplot state is involved; files are written atomically."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from deepcompressor.utils.files import write_bytes_atomic

__all__ = ["plot_channel_profile", "plot_depth_profiles"]


def _finite(values: Sequence[float | None]) -> np.ndarray:
    """Float array with missing/infinite entries as NaN (matplotlib leaves a gap)."""
    v = np.array([math.nan if x is None else float(x) for x in values], dtype=np.float64)
    v[~np.isfinite(v)] = math.nan
    return v


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    return write_bytes_atomic(path, buffer.getvalue())


def plot_depth_profiles(
    blocks: Sequence[int],
    ffn_down_channel_ratio: Sequence[float | None],
    ffn_down_ratio: Sequence[float | None],
    kv_blocks: Sequence[int],
    key_max_skew: Sequence[float | None],
    value_max_skew: Sequence[float | None],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Two panels across depth: (a) FFN down-projection outlier severity, (b) maximum K/V channel skewness."""
    fig = Figure(figsize=(10, 3.6))
    ax_a, ax_b = fig.subplots(1, 2)
    ax_a.plot(
        blocks, _finite(ffn_down_ratio), "s-", color="tab:red", label="max$_c$ max|X$_c$| / median|X| (whole input)"
    )
    ax_a.plot(
        blocks, _finite(ffn_down_channel_ratio), "o--", color="tab:gray", label="max$_c$ (max|X$_c$| / median|X$_c$|)"
    )
    ax_a.set_yscale("log")
    ax_a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_a.set_xlabel("block")
    ax_a.set_ylabel("max|X| / median|X|")
    ax_a.set_title("(a) FFN down-projection input outliers")
    ax_a.legend(fontsize=7, loc="best")
    ax_a.grid(True, which="both", alpha=0.3)
    ax_b.plot(kv_blocks, _finite(key_max_skew), "o-", color="tab:blue", label="keys")
    ax_b.plot(kv_blocks, _finite(value_max_skew), "s--", color="tab:green", label="values")
    ax_b.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_b.set_xlabel("block")
    ax_b.set_ylabel("max over channels of |skewness|")
    ax_b.set_title("(b) KV-cache channel skewness")
    ax_b.legend(fontsize=8)
    ax_b.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_channel_profile(
    channel_abs_max: Sequence[float],
    abs_median: float,
    layer_name: str,
    path: str | os.PathLike,
) -> Path:
    """Per-channel max|X| of one layer's input, with the median |X| of the whole input for reference."""
    values = np.asarray(channel_abs_max, dtype=np.float64)
    fig = Figure(figsize=(10, 3.2))
    ax = fig.subplots()
    ax.plot(np.arange(values.size), values, lw=0.8, color="tab:red")
    ax.axhline(abs_median, color="black", ls="--", lw=0.8, label=f"median |X| = {abs_median:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("input channel")
    ax.set_ylabel("max |X| over tokens")
    ax.set_title(f"Per-channel max |X|: {layer_name}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)
