"""Fidelity of a quantized transformer: per-layer errors and teacher-forced logits on held-out prompts.

Model level: for each held-out prompt (``eval.prompt_offset``, ``eval.num_prompts``; disjoint from the calibration
prompts) the full-precision model generates with the release sampling settings (seed ``eval.seed + i``),
returning its logits and the bits it sampled. Both models are then teacher-forced on those bits with the same
KV-cached scale-by-scale pass as the sampler (for the full-precision model this reproduces the sampler's logits
exactly), and compared:

- logit relative error ``||L_q - L|| / ||L||`` over the raw logits of every CFG row, token and scale;
- bit agreement: the share of bits whose argmax under the CFG-guided logits (the logits the sampler draws from;
  temperature does not change an argmax) is the same for both models.

Layer level: the relative output error of every calibrated linear on its calibration tokens, before (plain
round-to-nearest with the same formats) and after calibration, as reported by the engine.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

__all__ = [
    "FidelityReference",
    "compare_logits",
    "fidelity_markdown",
    "guided_logits",
    "reference_generations",
    "teacher_forced_logits",
]

logger = logging.getLogger(__name__)


@dataclass
class FidelityReference:
    """One held-out prompt's full-precision generation: text features, sampled inputs and logits per scale."""

    prompt_id: str
    kv_compact: torch.Tensor
    lens: list[int]
    next_inputs: list[torch.Tensor]
    logits: list[torch.Tensor]

    def state(self) -> dict:
        return {"prompt_id": self.prompt_id, "kv_compact": self.kv_compact, "lens": list(self.lens),
                "next_inputs": self.next_inputs, "logits": self.logits}

    @classmethod
    def from_state(cls, state: dict) -> FidelityReference:
        return cls(str(state["prompt_id"]), state["kv_compact"], [int(n) for n in state["lens"]],
                   list(state["next_inputs"]), list(state["logits"]))


@torch.no_grad()
def reference_generations(model, text_encoder, prompts: list[tuple[str, str]], settings, seed: int
                          ) -> list[FidelityReference]:
    """Generate every held-out prompt (one per batch) with the full-precision model, keeping logits on the CPU."""
    from infinity.sampler import sample

    refs = []
    for i, (prompt_id, caption) in enumerate(prompts):
        batch = text_encoder.encode([caption])
        result = sample(model, batch.kv_compact, batch.lens, [list(s) for s in settings.schedule], cfg=settings.cfg,
                        tau=settings.tau, top_k=settings.top_k, top_p=settings.top_p, seed=seed + i,
                        h_div_w=settings.h_div_w, return_logits=True)
        refs.append(FidelityReference(prompt_id, batch.kv_compact.float().cpu(), list(batch.lens),
                                      [x.cpu() for x in result.next_inputs], [x.cpu() for x in result.logits]))
    return refs


@torch.no_grad()
def teacher_forced_logits(model, kv_compact: torch.Tensor, lens: list[int], schedule, next_inputs, *, cfg, h_div_w
                          ) -> list[torch.Tensor]:
    """Logits ``[rows, L_s, V]`` (on the CPU) of every scale when the inputs of scales 1.. are ``next_inputs``.

    The sampler's own scale step (``infinity.sampler.ScaleStepper``) with the sampler's KV cache set-up, without
    the sampling.
    """
    from infinity.sampler import ScaleStepper, per_scale
    from infinity.schedules import tokens_per_scale

    schedule = [list(s) for s in schedule]
    use_cfg = any(c != 1.0 for c in per_scale(cfg, len(schedule), "cfg"))
    device = model.device
    kv_compact = kv_compact.to(device, torch.float32)
    lens = list(lens)
    if use_cfg:
        kv_compact = torch.cat((kv_compact, model.uncond_text(lens).float()))
        lens = lens + lens
    text = model.encode_text(kv_compact, lens)
    cache = model.kv_cache_factory(model)
    if hasattr(cache, "reserve"):
        cache.reserve(sum(tokens_per_scale(schedule)[:-1]))
    text.context.memo = {}
    step = ScaleStepper(model, text, cache, schedule, h_div_w, use_cfg)
    logits = []
    try:
        for si in range(len(schedule)):
            _, scale_logits = step(si, None if si == 0 else next_inputs[si - 1].to(device))
            logits.append(scale_logits.cpu())
    finally:
        cache.reset()
        text.context.memo = None
    return logits


def guided_logits(logits: torch.Tensor, cfg_scale: float, batch: int) -> torch.Tensor:
    """The CFG mix the sampler draws from (``cfg * cond + (1 - cfg) * uncond``; the rows themselves without CFG)."""
    if logits.shape[0] == batch:
        return logits
    return cfg_scale * logits[:batch] + (1 - cfg_scale) * logits[batch:]


def _bits(guided: torch.Tensor) -> torch.Tensor:
    return guided.reshape(*guided.shape[:-1], -1, 2).argmax(dim=-1)


def compare_logits(quantized: list[torch.Tensor], reference: list[torch.Tensor], cfg) -> dict:
    """Squared errors, norms and bit agreement per scale of one prompt (batch of one prompt, its CFG rows)."""
    from infinity.sampler import per_scale

    cfg_list = per_scale(cfg, len(reference), "cfg")
    scales = []
    for si, (lq, lr) in enumerate(zip(quantized, reference)):
        lq, lr = lq.double(), lr.double()
        bits_q, bits_r = _bits(guided_logits(lq, cfg_list[si], 1)), _bits(guided_logits(lr, cfg_list[si], 1))
        scales.append({
            "scale": si, "tokens": lr.shape[1],
            "squared_error": float((lq - lr).square().sum()), "squared_norm": float(lr.square().sum()),
            "bits": bits_r.numel(), "bits_agree": int((bits_q == bits_r).sum()),
        })
    return {"scales": scales}


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else float("nan")


def summarize_comparisons(per_prompt: list[dict]) -> dict:
    """Totals over prompts: overall and per-scale logit relative error and bit agreement."""
    num_scales = len(per_prompt[0]["scales"])
    per_scale = []
    for si in range(num_scales):
        rows = [p["scales"][si] for p in per_prompt]
        se, sn = sum(r["squared_error"] for r in rows), sum(r["squared_norm"] for r in rows)
        bits, agree = sum(r["bits"] for r in rows), sum(r["bits_agree"] for r in rows)
        per_scale.append({"scale": si, "tokens": rows[0]["tokens"], "logit_rel_error": _ratio(se, sn),
                          "bit_agreement": agree / bits})
    all_rows = [r for p in per_prompt for r in p["scales"]]
    se, sn = sum(r["squared_error"] for r in all_rows), sum(r["squared_norm"] for r in all_rows)
    bits, agree = sum(r["bits"] for r in all_rows), sum(r["bits_agree"] for r in all_rows)
    prompts = []
    for p in per_prompt:
        pse = sum(r["squared_error"] for r in p["scales"])
        psn = sum(r["squared_norm"] for r in p["scales"])
        pbits = sum(r["bits"] for r in p["scales"])
        pagree = sum(r["bits_agree"] for r in p["scales"])
        prompts.append({"prompt_id": p["prompt_id"], "logit_rel_error": _ratio(pse, psn),
                        "bit_agreement": pagree / pbits})
    return {"logit_rel_error": _ratio(se, sn), "bit_agreement": agree / bits, "bits": bits,
            "per_scale": per_scale, "per_prompt": prompts}


def evaluate_model(model, references: list[FidelityReference], settings) -> dict:
    """Teacher-force ``model`` on every reference and summarise the comparison."""
    per_prompt = []
    for ref in references:
        logits = teacher_forced_logits(model, ref.kv_compact, ref.lens, settings.schedule, ref.next_inputs,
                                       cfg=settings.cfg, h_div_w=settings.h_div_w)
        comparison = compare_logits(logits, ref.logits, settings.cfg)
        comparison["prompt_id"] = ref.prompt_id
        per_prompt.append(comparison)
    return summarize_comparisons(per_prompt)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def fidelity_markdown(report: dict) -> str:
    """Human-readable tables of a fidelity report (``fidelity.json``)."""
    model_level = report["model_level"]
    lines = [f"# Fidelity: {report['model']}", "", f"Method: {report['method']}", "",
             (f"Held-out prompts: {', '.join(report['eval']['prompt_ids'])} (seed {report['eval']['seed']}), "
              "teacher-forced on the full-precision bits."), "",
             "| metric | value |", "|---|---|",
             f"| logit relative error | {_fmt(model_level['logit_rel_error'])} |",
             f"| bit agreement | {100 * model_level['bit_agreement']:.2f}% |",
             f"| bits compared | {model_level['bits']} |", "",
             "## Per scale", "", "| scale | tokens | logit rel. error | bit agreement |", "|---|---|---|---|"]
    for row in model_level["per_scale"]:
        lines.append(f"| {row['scale']} | {row['tokens']} | {_fmt(row['logit_rel_error'])} | "
                     f"{100 * row['bit_agreement']:.2f}% |")
    lines += ["", "## Per layer (relative output error on the calibration tokens)", "",
              "| layer | kind | round-to-nearest | calibrated | smoothing alpha | tokens |", "|---|---|---|---|---|---|"]
    for row in report["layers"]:
        lines.append(f"| {row['name']} | {row['kind']} | {_fmt(row['error_rtn'])} | {_fmt(row['error_final'])} | "
                     f"{_fmt(row.get('smooth_alpha'), 3)} | {row['num_tokens']} |")
    return "\n".join(lines) + "\n"
