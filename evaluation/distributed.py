"""One process or ``torchrun``: the rank, the world size and the collectives the quality benchmark needs.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group uses gloo for CPU models and NCCL for
CUDA ones (each rank on ``cuda:LOCAL_RANK``); NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``) unless the
environment says otherwise. Without torchrun every call is a no-op on a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DistContext", "init_distributed"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: str | None = None  # the device this rank must use (None: the config's)
    initialized: bool = False

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.barrier()

    def gather_object(self, obj) -> list:
        """Every rank's ``obj`` on every rank (rank order)."""
        if not self.initialized:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shutdown(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialized = False


def init_distributed(device: str = "auto") -> DistContext:
    """The process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    return DistContext(rank, world, f"cuda:{local}" if on_gpu else "cpu", True)
