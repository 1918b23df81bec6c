"""infinity.vae: band-wise ("tiled") decode equals the plain decode and really lowers the peak memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from infinity.pipeline import images_to_uint8_rgb
from infinity.vae import (
    BSQVAE,
    VAE_CONFIGS,
    VAEConfig,
    build_vae_from_state_dict,
    load_vae,
    random_vae,
    tiny_vae_config,
)
from torch.profiler import ProfilerActivity, profile

GOLDEN = Path(__file__).parent / "data" / "infinity" / "golden"

# Shapes of the released VAEs in small: stride 8 with 4 levels (as d14_patchify), stride 16 with 5 levels (as d32),
# and one with 24-group norms, one block per level and 1x1 shortcuts at every level change. (VAEConfig has no
# patchify option: d14_patchify differs from d32 only in stride, levels and d.)
CONFIGS = {
    "s8_like_d14": tiny_vae_config(6, stride=8),
    "s16_like_d32": tiny_vae_config(8, stride=16),
    "groups24": VAEConfig(codebook_dim=5, stride=8, ch_mult=(1, 2, 2, 2), base_ch=48, num_res_blocks=1),
}


def _vae(cfg: VAEConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> BSQVAE:
    """Random VAE with non-trivial norm affines (weight 1 / bias 0 would hide a wrong affine path)."""
    sd = {k: v.clone() for k, v in random_vae(cfg, seed=seed, with_encoder=False).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in sd.items():
        if ".norm." in k:
            sd[k] = v + 0.1 * torch.randn(v.shape, generator=g)
    return build_vae_from_state_dict(cfg, sd, strict_encoder=False, dtype=dtype)


def _codes(cfg: VAEConfig, h: int = 5, w: int = 6, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, cfg.codebook_dim, h, w, generator=torch.Generator().manual_seed(7))


def _u8_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((images_to_uint8_rgb(a).int() - images_to_uint8_rgb(b).int()).abs().max())


@pytest.fixture(scope="module", params=list(CONFIGS))
def vae_and_plain(request):
    cfg = CONFIGS[request.param]
    vae = _vae(cfg)
    z = _codes(cfg)
    with torch.no_grad():
        return vae, z, vae.decode(z)


# Band heights: 1 (every band has halo on both sides), heights that divide none of the image / level heights
# (40 or 80 image rows; 5, 10, 20, ... at the levels), and 16.
@pytest.mark.parametrize("rows", [1, 6, 7, 16])
def test_tiled_matches_untiled_float32(vae_and_plain, rows):
    vae, z, plain = vae_and_plain
    tiled = vae.decode(z, tiled=True, tile_rows=rows)
    assert tiled.shape == plain.shape and tiled.dtype == torch.float32
    err = (tiled - plain).abs().max().item()
    print(f"{vae.cfg.name} rows={rows}: max |tiled - plain| = {err:.2e}")
    # Only float32 rounding: GroupNorm statistics summed in another order (and conv of a band vs the whole).
    assert err <= 5e-5
    assert _u8_diff(tiled, plain) <= 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiled_matches_untiled_float64(name):
    # In float64 rounding is ~1e-16: any error in halos, carried rows, up-sampling offsets or the statistics shows.
    cfg = CONFIGS[name]
    vae = _vae(cfg, torch.float64)
    z = _codes(cfg, 3, 7)
    with torch.no_grad():
        plain = vae.decode(z)
    for rows in (1, 3, 5):
        assert (vae.decode(z, tiled=True, tile_rows=rows) - plain).abs().max().item() <= 1e-12


def test_band_as_tall_as_the_image_is_the_plain_decode(vae_and_plain):
    vae, z, plain = vae_and_plain
    assert torch.equal(vae.decode(z, tiled=True, tile_rows=plain.shape[2]), plain)


def test_tiled_default_rows_and_golden_image():
    vae = load_vae(GOLDEN / "tiny_vae_state_dict.pt", VAE_CONFIGS["tiny_golden"], strict_encoder=False)
    gold = torch.load(GOLDEN / "tiny_p0_ar_greedy.pt", map_location="cpu", weights_only=True)
    img = vae.decode(gold["summed_codes"], tiled=True, tile_rows=5)
    torch.testing.assert_close(img, gold["image_float"], atol=1e-4, rtol=0)
    # 24-row images fit one default band (64 rows): exactly the plain decode.
    with torch.no_grad():
        assert torch.equal(vae.decode(gold["summed_codes"], tiled=True), vae.decode(gold["summed_codes"]))


def test_tiled_bfloat16_as_accurate_as_plain():
    # In bfloat16 a single 1-ulp difference (GroupNorm statistics) is amplified through a random network, so the two
    # bf16 decodes are not within one uint8 level of each other; neither is the plain bf16 decode of the float32 one.
    # What must hold: the tiled bf16 decode is as close to the float32 decode as the plain bf16 decode is.
    cfg = CONFIGS["s16_like_d32"]
    z = _codes(cfg)
    with torch.no_grad():
        ref = _vae(cfg).decode(z)
        vae = _vae(cfg, torch.bfloat16)
        plain = vae.decode(z)
    tiled = vae.decode(z, tiled=True, tile_rows=7)
    plain_err, tiled_err = (plain - ref).abs().mean().item(), (tiled - ref).abs().mean().item()
    print(f"bf16 mean |err| vs float32: plain {plain_err:.2e}, tiled {tiled_err:.2e}")
    assert tiled_err <= 1.1 * plain_err
    assert _u8_diff(tiled, ref) <= _u8_diff(plain, ref) + 2


def _peak_cpu_bytes(fn) -> int:
    """Peak of the bytes allocated by `fn` on the CPU: running sum of the profiler's allocation/free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_tiled_lowers_peak_memory():
    # Widths 64 / 64 / 32 (ch_mult 2, 2, 1 from the top): the full-resolution level has a 64 -> 32 block, as d32's
    # 256 -> 128. Image 128 x 128, float32, bands of 8 rows.
    cfg = VAEConfig(codebook_dim=8, stride=4, ch_mult=(1, 2, 2), base_ch=32)
    vae = random_vae(cfg, seed=0, with_encoder=False)
    z = _codes(cfg, 32, 32, batch=1)
    full_res_32ch = 32 * 128 * 128 * 4
    with torch.no_grad():
        plain = _peak_cpu_bytes(lambda: vae.decode(z))
        tiled = _peak_cpu_bytes(lambda: vae.decode(z, tiled=True, tile_rows=8))
    print(f"peak CPU bytes: plain {plain / 2**20:.2f} MiB, tiled {tiled / 2**20:.2f} MiB ({tiled / plain:.2f})")
    # The measurement sees the tensors: the plain decode holds several full-resolution activations at once, and the
    # tiled one at least the 64-channel input and the 32-channel output of the first full-resolution block.
    # Measured: plain 8 of these 32-channel tensors, tiled 3.4 (3 + band temporaries).
    assert plain >= 6 * full_res_32ch
    assert tiled >= 3 * full_res_32ch
    assert tiled <= 0.5 * plain


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tiled": True, "tile_rows": 0}, "positive int"),
        ({"tiled": True, "tile_rows": -3}, "positive int"),
        ({"tiled": True, "tile_rows": 2.5}, "positive int"),
        ({"tiled": True, "tile_rows": True}, "positive int"),
        ({"tile_rows": 8}, "only used with tiled=True"),
        ({"tiled": "yes"}, "tiled must be True or False"),
        ({"tiled": 1}, "tiled must be True or False"),
    ],
)
def test_bad_arguments(kwargs, match):
    cfg = CONFIGS["s8_like_d14"]
    with pytest.raises(ValueError, match=match):
        _vae(cfg).decode(_codes(cfg, 2, 2, batch=1), **kwargs)
