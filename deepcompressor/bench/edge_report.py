"""Which Jetson module a measured run fits, as a table and a bar chart.

A Jetson module has one memory shared by the CPU and the GPU. A run fits a module when the module's memory holds
the GPU peak the run reserved (``torch.cuda.max_memory_reserved``: what the allocator took from the device, not
only what live tensors used; the larger of the timed runs' and a new prompt's), what the process holds in host memory for the model (its resident set beyond
Python, torch and the CUDA runtime, measured before the model was built) and a fixed reserve for the operating
system and the CUDA context (``DEFAULT_RESERVE_GIB``, stated in every result).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_RESERVE_GIB", "JETSON_MODULES", "feasible_module", "format_report_table", "jetson_fit",
           "plot_peak_memory"]

# (name, memory in GiB): the memory configurations of the Jetson Orin modules.
JETSON_MODULES = (("Orin Nano 8GB", 8.0), ("Orin NX 16GB", 16.0), ("AGX Orin 32GB", 32.0), ("AGX Orin 64GB", 64.0))
# A headless JetPack system and the CUDA context of one process take roughly this much of the shared memory.
DEFAULT_RESERVE_GIB = 1.5


def feasible_module(needed_gib: float) -> str | None:
    """The smallest module whose memory holds ``needed_gib``, or None."""
    for name, memory in JETSON_MODULES:
        if needed_gib <= memory:
            return name
    return None


def jetson_fit(gpu_peak_gib: float | None, host_model_gib: float, reserve_gib: float = DEFAULT_RESERVE_GIB) -> dict:
    """What a run needs of a module's shared memory and the smallest module that has it (None on the CPU)."""
    if gpu_peak_gib is None:
        return {"needed_gib": None, "module": None}
    needed = gpu_peak_gib + max(host_model_gib, 0.0) + reserve_gib
    return {"needed_gib": needed, "gpu_peak_reserved_gib": gpu_peak_gib, "host_model_gib": max(host_model_gib, 0.0),
            "reserve_gib": reserve_gib, "module": feasible_module(needed)}


def _gib(value: float | None, width: int = 7) -> str:
    return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"


def format_report_table(res: dict) -> str:
    """One row per variant: stage latencies, speed-up, memory, bytes, bit agreement, Jetson module."""
    hw = res.get("image_hw", ["?", "?"])
    quant = res.get("quantization", {})
    title = (f"Infinity-{res['arch']} {hw[0]}x{hw[1]} ({res['tokens']} tokens), {res['device']}, cfg {res['cfg']}, "
             f"backend {res['backend']}, median of {res['repeats']} after {res['warmup']} warm-up")
    lines = [title]
    if quant:
        lines.append(f"W4A4 layers: {quant['num_layers']} from {quant['source']} ({quant['w4a4_inputs']} with 4-bit "
                     f"inputs, {quant['weight_only']} weight-only)"
                     + (f"; KV cache: {res['kv']['source']}" if "kv" in res else ""))
    header = (f"{'variant':<9} {'text':>6} {'transf.':>7} {'vae':>6} {'total':>6} {'x bf16':>6} | {'peak':>6} "
              f"{'reserv.':>7} {'new pr.':>7} {'transf.':>7} {'KV':>6} {'T5':>6} | {'bits=':>5} | Jetson (needs GiB)")
    lines += [header, "-" * len(header)]
    for name, stats in res["variants"].items():
        med = stats["median_seconds"]
        speed = stats.get("speedup_vs_baseline", {}).get("total")
        agree = stats.get("bit_agreement_vs_baseline", {}).get("overall")
        fit = stats.get("jetson", {})
        module = fit.get("module") or ("-" if fit.get("needed_gib") is None else "none")
        needs = f" ({fit['needed_gib']:.2f})" if fit.get("needed_gib") is not None else ""
        lines.append(
            f"{name:<9} {med['text_encoder']:6.3f} {med['transformer']:7.3f} {med['vae_decode']:6.3f} "
            f"{med['total']:6.3f} {(f'{speed:6.2f}' if speed else '-'):>6} | {_gib(stats['peak_memory_gib'], 6)} "
            f"{_gib(stats.get('peak_reserved_gib'))} {_gib(stats.get('new_prompt', {}).get('peak_memory_gib'))} "
            f"{stats['transformer_gib']:7.3f} {stats['kv_cache_gib']:6.3f} "
            f"{_gib(stats.get('text_encoder_gib'), 6)} | {(f'{agree:5.3f}' if agree is not None else '-'):>5} | "
            f"{module}{needs}")
    units = ("seconds (median); memory in GiB: peak allocated, peak reserved, peak allocated with a new prompt (text "
             "encoder loaded), resident bytes")
    lines.append(f"{units}; Jetson: reserved peak + host memory for the model + {res.get('jetson_reserve_gib', 0):.1f} "
                 "GiB for the OS and CUDA context")
    if "quantized_load_peak_gib" in res:
        lines.append(f"quantized model load: peak {_gib(res['quantized_load_peak_gib']).strip()} GiB above what was "
                     f"allocated before, {res.get('quantized_load_seconds', 0):.1f} s, no full-precision weights read")
    return "\n".join(lines)


def plot_peak_memory(res: dict, path: str | Path) -> Path | None:
    """Bar chart of each variant's peak GPU memory (allocated, and reserved on top) with the modules' memory
    less the reserve as horizontal lines; None when there is no GPU peak (CPU runs) or no matplotlib."""
    variants = {name: s for name, s in res["variants"].items() if s.get("peak_memory_gib") is not None}
    if not variants:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    names = list(variants)
    allocated = [variants[n]["peak_memory_gib"] for n in names]
    reserved = [max(variants[n].get("peak_reserved_gib") or 0.0, a) for n, a in zip(names, allocated)]
    new_prompt = [variants[n].get("new_prompt", {}).get("peak_memory_gib") for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ax.bar(names, reserved, color="#c7d7ee", label="peak reserved")
    ax.bar(names, allocated, color="#3b6ea8", label="peak allocated (prompt features cached)")
    if any(v is not None for v in new_prompt):
        ax.scatter([i for i, v in enumerate(new_prompt) if v is not None], [v for v in new_prompt if v is not None],
                   marker="_", s=900, color="black", label="peak allocated, new prompt (text encoder loaded)")
    for i, value in enumerate(allocated):
        ax.text(i, value / 2, f"{value:.2f}", ha="center", fontsize=9, color="white")
    reserve = res.get("jetson_reserve_gib", DEFAULT_RESERVE_GIB)
    top = max([*reserved, *(v for v in new_prompt if v is not None)]) * 1.1
    for module, memory in JETSON_MODULES:
        usable = memory - reserve
        if usable <= top * 1.3:
            ax.axhline(usable, color="#b04040", linestyle="--", linewidth=1)
            ax.text(-0.45, usable, f"{module} less {reserve:g} GiB", va="bottom", ha="left", fontsize=8,
                    color="#b04040", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1}, zorder=3)
            top = max(top, usable * 1.08)
    ax.set_ylim(0, top)
    ax.set_ylabel("GiB")
    ax.set_title(f"Infinity-{res['arch']} {res.get('image_hw', ['?'])[0]}px, {res['device']}: peak GPU memory")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
