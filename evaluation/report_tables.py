"""Summaries of per-layer diagnostics and their Markdown tables (the paper's Tables 1 and 2).

Input rows are plain dicts, one per layer, as written to ``stats.json``:

* linear layers: ``name``, ``kind``, ``block`` (global index or None) and the scalars of
  ``evaluation.stats.ActivationStats`` (``max_to_median``, ``kurtosis``, ``channel_max_to_median_max`` ...);
* KV caches: ``name`` (block module name), ``block``, ``k`` and ``v`` with the scalars of ``KVStats``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["BLOCK_KINDS", "format_number", "markdown_report", "summarize_kv", "summarize_linear"]

# Per-block linear layer kinds in the order of Table 1: (kind, display label, module suffix).
BLOCK_KINDS: tuple[tuple[str, str, str], ...] = (
    ("sa_qkv", "QKV projection", "sa.mat_qkv"),
    ("sa_out", "Out projection", "sa.proj"),
    ("ffn_up", "FFN up", "ffn.fc1"),
    ("ffn_down", "FFN down", "ffn.fc2"),
    ("ca_q", "Cross-attn Q", "ca.mat_q"),
    ("ca_kv", "Cross-attn KV", "ca.mat_kv"),
    ("ca_out", "Cross-attn out", "ca.proj"),
)

_LINEAR_METRICS = ("max_to_median", "kurtosis", "channel_max_to_median_max")
_KV_METRICS = ("cv_chan", "cv_tok", "mean_abs_skew", "max_abs_skew")


def _mean_max(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and max ignoring missing (None/NaN) entries; an infinite entry makes both infinite."""
    v = np.array([math.nan if x is None else float(x) for x in values], dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.max())


def summarize_linear(rows: Iterable[dict]) -> dict[str, dict]:
    """Per block kind: number of layers and mean/max across blocks of every Table-1 metric."""
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("block") is not None:
            by_kind.setdefault(row["kind"], []).append(row)
    summary = {}
    for kind, _, _ in BLOCK_KINDS:
        layers = by_kind.get(kind, [])
        if not layers:
            continue
        entry: dict = {"num_layers": len(layers)}
        for metric in _LINEAR_METRICS:
            entry[f"{metric}_mean"], entry[f"{metric}_max"] = _mean_max([r.get(metric) for r in layers])
        summary[kind] = entry
    return summary


def summarize_kv(rows: Iterable[dict]) -> dict[str, dict]:
    """For K and V: mean and max across layers of CV_chan, CV_tok, mean |gamma| and max |gamma|."""
    rows = list(rows)
    summary = {}
    for which in ("k", "v"):
        entry: dict = {"num_layers": len(rows)}
        for metric in _KV_METRICS:
            entry[f"{metric}_mean"], entry[f"{metric}_max"] = _mean_max([r[which].get(metric) for r in rows])
        summary[which] = entry
    return summary


def format_number(x: float | None) -> str:
    """Compact human-readable number: ``n/a`` for missing, 3 significant digits otherwise."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.01 or x == 0:
        return f"{x:.2f}"
    return f"{x:.2e}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown_report(
    title: str,
    meta_lines: Sequence[str],
    linear_rows: Sequence[dict],
    kv_rows: Sequence[dict],
    figures: Sequence[tuple[str, str]] = (),
) -> str:
    """The whole ``tables.md``: Table 1 and Table 2 summaries, then every layer, then the figures."""
    f = format_number
    linear_summary = summarize_linear(linear_rows)
    kv_summary = summarize_kv(kv_rows) if kv_rows else {}
    labels = {kind: (label, suffix) for kind, label, suffix in BLOCK_KINDS}
    out = [f"# {title}", ""]
    out += [f"- {line}" for line in meta_lines]
    out += [
        "",
        "## Table 1: input activations of the linear layers (mean / max across blocks)",
        "",
        "max/median = max|X| / median|X| over the whole input; kurtosis = Fisher excess kurtosis of the input;",
        "per-channel = the highest max|X_c| / median|X_c| over the input channels c (channels whose median is 0",
        "are left out and counted in the per-layer table).",
        "",
    ]
    out += _table(
        [
            "Layer",
            "blocks",
            "max/median mean",
            "max/median max",
            "kurtosis mean",
            "kurtosis max",
            "per-channel max/median mean",
            "per-channel max/median max",
        ],
        (
            [
                f"{labels[kind][0]} (`{labels[kind][1]}`)",
                str(s["num_layers"]),
                f(s["max_to_median_mean"]),
                f(s["max_to_median_max"]),
                f(s["kurtosis_mean"]),
                f(s["kurtosis_max"]),
                f(s["channel_max_to_median_max_mean"]),
                f(s["channel_max_to_median_max_max"]),
            ]
            for kind, s in linear_summary.items()
        ),
    )
    if kv_summary:
        out += [
            "",
            "## Table 2: self-attention KV cache (K/V as cached: cos-normalised and rotated keys, values)",
            "",
            "R = max - min of a channel over tokens (per channel) or of a token over channels (per token);",
            "CV = std / mean of R across channels (CV_chan) or tokens (CV_tok); gamma = per-channel skewness.",
            f"Mean across {kv_summary['k']['num_layers']} layers, except max |gamma| (max across layers).",
            "",
        ]
        out += _table(
            ["Cache", "CV_chan", "CV_tok", "mean abs gamma", "max abs gamma"],
            (
                [
                    name,
                    f(kv_summary[which]["cv_chan_mean"]),
                    f(kv_summary[which]["cv_tok_mean"]),
                    f(kv_summary[which]["mean_abs_skew_mean"]),
                    f(kv_summary[which]["max_abs_skew_max"]),
                ]
                for which, name in (("k", "Key"), ("v", "Value"))
            ),
        )
    out += ["", "## Every linear layer", ""]
    out += _table(
        [
            "Layer",
            "kind",
            "tokens",
            "sampled",
            "abs max",
            "max/median",
            "kurtosis",
            "per-channel max/median (channel)",
            "zero-median channels",
        ],
        (
            [
                f"`{r['name']}`",
                r["kind"],
                f(r["num_tokens"]),
                f(r["num_sampled"]),
                f(r["abs_max"]),
                f(r["max_to_median"]),
                f(r["kurtosis"]),
                f"{f(r['channel_max_to_median_max'])} ({r['worst_channel']})",
                f(r.get("num_zero_median_channels")),
            ]
            for r in linear_rows
        ),
    )
    if kv_rows:
        out += ["", "## KV cache of every block", ""]
        out += _table(
            [
                "Block",
                "tokens",
                "K CV_chan",
                "K CV_tok",
                "K mean abs gamma",
                "K max abs gamma",
                "V CV_chan",
                "V CV_tok",
                "V mean abs gamma",
                "V max abs gamma",
            ],
            (
                [f"{r['block']} (`{r['name']}`)", f(r["k"]["num_tokens"])]
                + [f(r[which][metric]) for which in ("k", "v") for metric in _KV_METRICS]
                for r in kv_rows
            ),
        )
    if figures:
        out += ["", "## Figures", ""]
        out += [f"- {caption}: `{path}`" for caption, path in figures]
    return "\n".join(out) + "\n"
