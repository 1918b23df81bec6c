"""2-D rotary position embedding of the self-attention (normalised to the template's largest scale).

Every token of a ``ph x pw`` scale is placed on a 128 x 128 grid at row ``round(i * Hf / ph)`` and column
``round(j * Wf / pw)``, where ``(Hf, Wf)`` is the last grid of the template's 13-scale schedule, so all scales
cover the same image area. The first half of the rotation pairs turns with the row, the second with the column.
Rotation acts on adjacent channel pairs ``(2m, 2m+1)``. Tables are float32.
"""

from __future__ import annotations

import torch

from .schedules import full_schedule, nearest_template, template_of_schedule

__all__ = ["apply_rope", "rope_angles", "rope_table"]

ROPE_BASE = 10000.0
GRID_SIZE = 128

_TABLE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _frequencies(head_dim: int) -> torch.Tensor:
    half = head_dim // 2
    exponents = torch.arange(0, half, 2, dtype=torch.int64).float() / half
    return 1.0 / (ROPE_BASE**exponents)  # [half / 2]


def rope_angles(head_dim: int, schedule, h_div_w: float | None = None) -> torch.Tensor:
    """Rotation angles ``[L, head_dim / 2]`` of every token of ``schedule`` (flattened, scale after scale)."""
    template = nearest_template(h_div_w) if h_div_w is not None else template_of_schedule(schedule)
    full = full_schedule(template)
    grids = [(int(h), int(w)) for _, h, w in schedule]
    if [(h, w) for _, h, w in full[: len(grids)]] != grids:
        raise ValueError(f"scale schedule {grids} is not a prefix of the 1M schedule of template h/w={template}")
    _, last_h, last_w = full[-1]
    freqs = _frequencies(head_dim)
    angles = []
    for ph, pw in grids:
        rows = torch.round(torch.arange(ph, dtype=torch.float32) * (last_h / ph))
        cols = torch.round(torch.arange(pw, dtype=torch.float32) * (last_w / pw))
        if rows.max() >= GRID_SIZE or cols.max() >= GRID_SIZE:
            raise ValueError(f"RoPE grid position out of the {GRID_SIZE}x{GRID_SIZE} table for scale {ph}x{pw}")
        row_angles = (rows[:, None] * freqs).unsqueeze(1).expand(ph, pw, -1)
        col_angles = (cols[:, None] * freqs).unsqueeze(0).expand(ph, pw, -1)
        angles.append(torch.cat([row_angles, col_angles], dim=-1).reshape(ph * pw, -1))
    return torch.cat(angles, dim=0)


def rope_table(
    head_dim: int, schedule, h_div_w: float | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[L, head_dim / 2]`` float32 on ``device``; cached per schedule and device."""
    key = (head_dim, tuple((int(h), int(w)) for _, h, w in schedule), h_div_w, str(torch.device(device)))
    table = _TABLE_CACHE.get(key)
    if table is None:
        angles = rope_angles(head_dim, schedule, h_div_w)
        table = (angles.cos().to(device), angles.sin().to(device))
        _TABLE_CACHE[key] = table
    return table


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x [..., L, head_dim]`` by the angles of ``cos``/``sin [L, head_dim/2]``."""
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
