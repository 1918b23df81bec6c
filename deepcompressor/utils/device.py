"""Device helpers shared by the apps and the benchmarks."""

from __future__ import annotations

import torch

__all__ = ["synchronize"]


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (timings must not stop before the kernels do); a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
