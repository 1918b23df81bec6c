"""Distribution-guided calibration (DGC): calibration prompts chosen to cover the activation distribution.

From a pool of candidate prompts, each captured with the full-precision model, ``dgc_select`` keeps the ``k`` whose
block inputs together cover the pool's activation distribution best:

- each candidate is represented by a deterministic sample of its first-block input values (every captured scale,
  both CFG rows; ``value_sample``);
- the bins are ``bins`` equal-mass quantile bins of all candidates' samples pooled, so the histogram of a subset is
  uniform over them exactly when the subset has the pool's distribution, and its Shannon entropy is largest then;
- greedy: starting from nothing, add the candidate that raises the entropy of the selected histograms' sum most
  (ties go to the earlier prompt), until ``k`` are chosen.

Pure functions on tensors; ``ptq_infinity`` applies them with ``collect.selection: dgc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DGC_SAMPLE_VALUES", "dgc_select", "histogram_entropy", "quantile_edges", "subset_entropy", "value_sample"]

DGC_SAMPLE_VALUES = 1 << 16  # values per candidate prompt
_QUANTILE_LIMIT = 1 << 22  # torch.quantile's input is bounded; the pooled sample is thinned to this


def value_sample(xs: Sequence[torch.Tensor], count: int = DGC_SAMPLE_VALUES, seed: int = 0) -> torch.Tensor:
    """``count`` values drawn (seeded, with replacement) from all elements of ``xs``, as float32 on the CPU."""
    flat = torch.cat([x.detach().reshape(-1).float().cpu() for x in xs])
    if flat.numel() <= count:
        return flat.clone()
    generator = torch.Generator().manual_seed(int(seed))
    return flat[torch.randint(flat.numel(), (count,), generator=generator)]


def quantile_edges(samples: Sequence[torch.Tensor], bins: int) -> torch.Tensor:
    """The ``bins - 1`` inner edges of equal-mass bins of the pooled samples (float64)."""
    pooled = torch.cat([s.double() for s in samples])
    if pooled.numel() > _QUANTILE_LIMIT:
        step = -(-pooled.numel() // _QUANTILE_LIMIT)
        pooled = pooled.sort().values[::step]
    levels = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    return torch.quantile(pooled, levels)


def histogram_entropy(counts: torch.Tensor) -> float:
    """Shannon entropy (nats) of a histogram of counts."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0].double() / total
    return float(-(p * p.log()).sum())


def _histograms(samples: Sequence[torch.Tensor], bins: int) -> torch.Tensor:
    """``[len(samples), bins]`` counts of every sample over the pool's quantile bins."""
    edges = quantile_edges(samples, bins)
    return torch.stack([torch.bincount(torch.bucketize(s.double(), edges), minlength=bins).double()
                        for s in samples])


def subset_entropy(samples: Sequence[torch.Tensor], indices: Sequence[int], bins: int = 64) -> float:
    """Entropy of the pooled histogram of ``samples[indices]`` over the bins of all ``samples``."""
    return histogram_entropy(_histograms(samples, bins)[list(indices)].sum(dim=0))


def dgc_select(samples: Sequence[torch.Tensor], k: int, bins: int = 64) -> tuple[list[int], list[float]]:
    """Indices of the ``k`` samples chosen greedily (module docstring), in the order chosen, and the entropy of the
    selection after each step."""
    if not 1 <= k <= len(samples):
        raise ValueError(f"DGC: cannot choose {k} of {len(samples)} candidates")
    hists = _histograms(samples, bins)
    total = torch.zeros(bins, dtype=torch.float64)
    chosen: list[int] = []
    entropies: list[float] = []
    for _ in range(k):
        best, best_entropy = -1, -1.0
        for index in range(len(samples)):
            if index in chosen:
                continue
            entropy = histogram_entropy(total + hists[index])
            if entropy > best_entropy + 1e-12:
                best, best_entropy = index, entropy
        chosen.append(best)
        entropies.append(best_entropy)
        total += hists[best]
    return chosen, entropies
