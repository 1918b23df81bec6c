"""Multi-scale token schedules (which h x w token grid each autoregressive step produces).

Every aspect-ratio template has one 13-scale '1M' schedule; the smaller resolution presets are prefixes of it
('0.06M' = 7 scales, '0.25M' = 10, '0.60M' = 12). Templates for h/w < 1 are the transposed ones of h/w > 1.
A schedule is a list of ``(t, h, w)`` with ``t = 1`` at inference.
"""

from __future__ import annotations

__all__ = [
    "PN_NUM_SCALES",
    "TEMPLATES",
    "full_schedule",
    "get_scale_schedule",
    "image_size",
    "nearest_template",
    "scale_starts",
    "template_of_schedule",
    "tokens_per_scale",
    "vae_schedule",
]

Schedule = list[tuple[int, int, int]]

PN_NUM_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

# (h, w) grids of the 13-scale schedule for h/w >= 1, written "h x w".
_TALL_SPEC = {
    1.0: "1x1 2x2 4x4 6x6 8x8 12x12 16x16 20x20 24x24 32x32 40x40 48x48 64x64",
    1.25: "1x1 2x2 3x3 5x4 10x8 15x12 20x16 25x20 30x24 35x28 45x36 55x44 70x56",
    1.333: "1x1 2x2 4x3 8x6 12x9 16x12 20x15 24x18 28x21 36x27 48x36 60x45 72x54",
    1.5: "1x1 2x2 3x2 6x4 9x6 15x10 21x14 27x18 33x22 39x26 48x32 63x42 78x52",
    1.75: "1x1 2x2 3x3 7x4 11x6 14x8 21x12 28x16 35x20 42x24 56x32 70x40 84x48",
    2.0: "1x1 2x2 4x2 6x3 10x5 16x8 22x11 30x15 38x19 46x23 60x30 74x37 90x45",
    2.5: "1x1 2x2 5x2 10x4 15x6 20x8 25x10 30x12 40x16 50x20 65x26 80x32 100x40",
    3.0: "1x1 2x2 6x2 9x3 15x5 21x7 27x9 36x12 45x15 54x18 72x24 90x30 111x37",
}
_TALL = {ratio: [tuple(int(v) for v in grid.split("x")) for grid in spec.split()] for ratio, spec in _TALL_SPEC.items()}
_WIDE_KEYS = {1.25: 0.8, 1.333: 0.75, 1.5: 0.666, 1.75: 0.571, 2.0: 0.5, 2.5: 0.4, 3.0: 0.333}

TEMPLATES: dict[float, list[tuple[int, int]]] = dict(_TALL)
for _tall, _wide in _WIDE_KEYS.items():
    TEMPLATES[_wide] = [(w, h) for h, w in _TALL[_tall]]


def nearest_template(h_div_w: float) -> float:
    """The template ratio closest to ``h_div_w`` (absolute difference)."""
    if not h_div_w > 0:
        raise ValueError(f"h_div_w must be positive, got {h_div_w}")
    return min(TEMPLATES, key=lambda t: abs(t - h_div_w))


def full_schedule(h_div_w: float = 1.0) -> Schedule:
    """The 13-scale '1M' schedule of the template nearest to ``h_div_w``."""
    return [(1, h, w) for h, w in TEMPLATES[nearest_template(h_div_w)]]


def get_scale_schedule(pn: str = "1M", h_div_w: float = 1.0) -> Schedule:
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"unknown resolution preset pn={pn!r}; known: {', '.join(PN_NUM_SCALES)}")
    return full_schedule(h_div_w)[: PN_NUM_SCALES[pn]]


def template_of_schedule(schedule) -> float:
    """The template whose 1M schedule starts with ``schedule`` (RoPE positions are defined relative to it)."""
    grids = [(int(h), int(w)) for _, h, w in schedule]
    if not grids:
        raise ValueError("empty scale schedule")
    for key, full in TEMPLATES.items():
        if full[: len(grids)] == grids:
            return key
    raise ValueError(f"scale schedule {grids} is not a prefix of any template's 1M schedule")


def vae_schedule(schedule, patchify: bool) -> Schedule:
    """Latent grids of the VAE for a token schedule (2x larger per side with 2x2 spatial patchify)."""
    f = 2 if patchify else 1
    return [(1, int(h) * f, int(w) * f) for _, h, w in schedule]


def tokens_per_scale(schedule) -> list[int]:
    return [int(t) * int(h) * int(w) for t, h, w in schedule]


def scale_starts(schedule) -> list[int]:
    """Flattened sequence offset of each scale's first token (scale 0 = the SOS token)."""
    starts, total = [], 0
    for n in tokens_per_scale(schedule):
        starts.append(total)
        total += n
    return starts


def image_size(schedule, vae_stride: int, patchify: bool) -> tuple[int, int]:
    """(height, width) in pixels of the image decoded from the last scale."""
    _, h, w = vae_schedule(schedule, patchify)[-1]
    return h * vae_stride, w * vae_stride
