"""infinity.vae: BSQ-VAE decoder against the golden files and a float64 reference, manifests, strict loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from infinity.codes import accumulate_scale, bits_to_code_map, summed_codes_from_bits
from infinity.vae import (
    BSQVAE,
    VAE_CONFIGS,
    VAECheckpointError,
    VAEConfig,
    build_vae_from_state_dict,
    image_to_uint8_bgr,
    load_vae,
    random_vae,
    tiny_vae_config,
)

DATA = Path(__file__).parent / "data" / "infinity"
GOLDEN = DATA / "golden"
TINY = VAE_CONFIGS["tiny_golden"]


def _load(name: str) -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def golden_sd() -> dict[str, torch.Tensor]:
    return _load("tiny_vae_state_dict.pt")


@pytest.fixture(scope="module")
def golden_vae() -> BSQVAE:
    return load_vae(GOLDEN / "tiny_vae_state_dict.pt", TINY, strict_encoder=False)


# ------------------------------------------------------------------------------------ float64 functional reference


def _ref_decoder(sd: dict[str, torch.Tensor], cfg: VAEConfig, z: torch.Tensor) -> torch.Tensor:
    """Decoder of ARCHITECTURE §7.1 written directly from the prose, in float64, reading weights by name."""
    p = {k: v.double() for k, v in sd.items() if k.startswith("decoder.")}

    def conv(name, x, pad):
        return F.conv2d(x, p[f"{name}.conv.weight"], p[f"{name}.conv.bias"], padding=pad)

    def gn(name, x):
        c = x.shape[1]
        return F.group_norm(x, 32 if c % 32 == 0 else 24, p[f"{name}.norm.weight"], p[f"{name}.norm.bias"], eps=1e-6)

    def sw(x):
        return x * torch.sigmoid(x)

    def resblock(name, x):
        h = conv(f"{name}.conv1", sw(gn(f"{name}.norm1", x)), 1)
        h = conv(f"{name}.conv2", sw(gn(f"{name}.norm2", h)), 1)
        sc = conv(f"{name}.nin_shortcut", x, 0) if f"{name}.nin_shortcut.conv.weight" in p else x
        return sc + h

    h = conv("decoder.conv_in", z.double(), 1)
    h = resblock("decoder.mid.block_2", resblock("decoder.mid.block_1", h))
    n_up = int(math.log2(cfg.stride))
    for i in reversed(range(len(cfg.ch_mult))):
        for j in range(cfg.num_res_blocks + 1):
            h = resblock(f"decoder.up.{i}.block.{j}", h)
        if 1 <= i <= n_up:
            h = conv(f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"), 1)
    h = conv("decoder.conv_out", sw(gn("decoder.norm_out", h)), 1)
    return h.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------- golden files


def test_golden_decode_from_bits(golden_vae):
    gold = _load("tiny_vae_decode.pt")
    sched = gold["scale_schedule"].tolist()
    bits = [gold[f"bits_si{k}"] for k in range(len(sched))]
    torch.testing.assert_close(summed_codes_from_bits(bits, sched), gold["summed_codes"][:, :, 0], atol=1e-6, rtol=0)
    with torch.no_grad():
        recon = golden_vae.decode_from_bits(bits, sched)
    assert recon.shape == (2, 3, 24, 24) and recon.dtype == torch.float32
    torch.testing.assert_close(recon, gold["recon"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["p0", "p1"])
def test_golden_ar_images_from_summed_codes(golden_vae, variant):
    gold = _load(f"tiny_{variant}_ar_greedy.pt")
    with torch.no_grad():
        img = golden_vae.decode(gold["summed_codes"])
    torch.testing.assert_close(img, gold["image_float"], atol=1e-4, rtol=0)
    bgr = image_to_uint8_bgr(img)
    assert bgr.dtype == torch.uint8 and bgr.shape == gold["image_uint8_bgr"].shape
    assert (bgr.int() - gold["image_uint8_bgr"].int()).abs().max() <= 1
    # Conversion rule alone, on the reference float image: exact.
    assert torch.equal(image_to_uint8_bgr(gold["image_float"]), gold["image_uint8_bgr"])


def test_decoder_matches_float64_reference_on_golden_weights(golden_vae, golden_sd):
    z = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = golden_vae.decode(z)
    torch.testing.assert_close(out.double(), _ref_decoder(golden_sd, TINY, z), atol=1e-4, rtol=0)


def test_decoder_matches_float64_reference_24_groups_and_other_stride():
    # base_ch 48: widths 48 / 96 use 24 / 32 groups; stride 8 with 4 levels (three up-samplings).
    cfg = VAEConfig(codebook_dim=5, stride=8, ch_mult=(1, 2, 2, 2), base_ch=48, num_res_blocks=1)
    vae = random_vae(cfg, seed=3, with_encoder=False)
    assert vae.decoder.norm_out.norm.num_groups == 24 and vae.decoder.mid.block_1.norm1.norm.num_groups == 32
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    # Make the affine norm parameters non-trivial so a wrong norm path cannot hide.
    g = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if ".norm." in k:
            sd[k] = v + 0.1 * torch.randn(v.shape, generator=g)
    vae = build_vae_from_state_dict(cfg, sd, strict_encoder=False)
    z = torch.randn(1, 5, 3, 4, generator=g)
    with torch.no_grad():
        out = vae.decode(z)
    assert out.shape == (1, 3, 24, 32)
    torch.testing.assert_close(out.double(), _ref_decoder(sd, cfg, z), atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize(
    "manifest,preset",
    [("manifest_vae_d32_infinity_2b.json", "d32"), ("manifest_vae_d14_patchify_infinity_8b.json", "d14_patchify")],
)
def test_state_dict_matches_released_manifest(manifest, preset):
    m = json.loads((DATA / manifest).read_text())
    cfg = VAE_CONFIGS[preset]
    assert m["config"]["codebook_dim"] == cfg.codebook_dim and m["config"]["patch_size"] == cfg.stride
    assert tuple(m["config"]["decoder_ch_mult"]) == cfg.ch_mult and m["config"]["base_ch"] == cfg.base_ch
    with torch.device("meta"):
        vae = BSQVAE(cfg)
    got = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in vae.state_dict().items()]
    want = [(e["name"], tuple(e["shape"]), e["dtype"]) for e in m["state_dict"]]
    assert set(got) - set(want) == set()
    assert set(want) - set(got) == set()
    assert got == want  # same order as well
    params = dict(vae.named_parameters())
    for e in m["state_dict"]:
        assert (e["name"] in params) == (e["kind"] == "parameter"), e["name"]
    assert sum(p.numel() for p in vae.parameters()) == m["num_parameters"]
    non_persistent = {
        f"{mod}.{b}" for mod, sub in vae.named_modules() for b in sub._non_persistent_buffers_set
    }
    assert non_persistent == {e["name"] for e in m["non_persistent_buffers"]}


def test_decoder_parameter_counts_of_released_vaes():
    # ARCHITECTURE §1: decoder 65,092,355 (d32) and 48,484,611 (d14 patchify).
    for preset, n in (("d32", 65_092_355), ("d14_patchify", 48_484_611)):
        with torch.device("meta"):
            vae = BSQVAE(VAE_CONFIGS[preset], with_encoder=False)
        assert sum(p.numel() for p in vae.decoder.parameters()) == n


# -------------------------------------------------------------------------------------------------- strict loading


def _plain(name: str) -> str:
    return name.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias").replace(
        ".norm.weight", ".weight").replace(".norm.bias", ".bias")


def test_load_is_zero_copy_from_checkpoint(golden_sd):
    vae = build_vae_from_state_dict(TINY, golden_sd, strict_encoder=False)
    # Tensors are taken over from the checkpoint (built on meta, assign=True): no second initialisation.
    w = vae.decoder.conv_in.conv.weight
    assert w.data_ptr() == golden_sd["decoder.conv_in.conv.weight"].data_ptr()
    assert not any(t.is_meta for t in list(vae.parameters()) + list(vae.buffers()))
    assert vae.quantizer is vae.quantize and vae.quantizer.lfq.zero.item() == 0.0
    assert vae.encoder is None and not vae.training
    with pytest.raises(RuntimeError, match="decoder-only"):
        vae.encode(torch.zeros(1, 3, 8, 8), [(1, 2, 2)])


def test_plain_spelling_and_wrapped_file_give_same_decoder(tmp_path, golden_sd, golden_vae):
    plain = {_plain(k): v for k, v in golden_sd.items()}
    assert "decoder.up.1.upsample.conv.weight" in plain and "decoder.norm_out.weight" in plain
    path = tmp_path / "released_style.pth"
    torch.save({"vae": plain, "ema": {"junk": torch.zeros(1)}}, path)
    vae = load_vae(path, TINY, strict_encoder=False)
    z = torch.randn(1, 6, 3, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(vae.decode(z), golden_vae.decode(z))
    # The non-persistent constant is ignored when present.
    extra = dict(golden_sd, **{"quantizer.lfq.zero": torch.tensor(0.0)})
    build_vae_from_state_dict(TINY, extra, strict_encoder=False)


def test_strict_errors_name_the_tensors(golden_sd):
    sd = dict(golden_sd)
    del sd["decoder.up.1.block.0.nin_shortcut.conv.bias"]
    with pytest.raises(VAECheckpointError, match=r"missing 1: decoder\.up\.1\.block\.0\.nin_shortcut\.conv\.bias"):
        build_vae_from_state_dict(TINY, sd, strict_encoder=False)
    sd = dict(golden_sd, **{"decoder.extra.weight": torch.zeros(3)})
    with pytest.raises(VAECheckpointError, match=r"unexpected 1: decoder\.extra\.weight"):
        build_vae_from_state_dict(TINY, sd, strict_encoder=False)
    sd = dict(golden_sd, **{"decoder.conv_out.conv.bias": torch.zeros(4)})
    with pytest.raises(VAECheckpointError, match=r"mis-shaped 1: decoder\.conv_out\.conv\.bias \(checkpoint \(4,\)"):
        build_vae_from_state_dict(TINY, sd, strict_encoder=False)
    sd = dict(golden_sd, **{"decoder.conv_in.weight": golden_sd["decoder.conv_in.conv.weight"]})
    with pytest.raises(VAECheckpointError, match="given twice"):
        build_vae_from_state_dict(TINY, sd, strict_encoder=False)
    sd = dict(golden_sd, **{"quantize.lfq.mask": golden_sd["quantize.lfq.mask"].flip(0)})
    with pytest.raises(VAECheckpointError, match=r"quantize\.lfq\.mask is not the bit mask"):
        build_vae_from_state_dict(TINY, sd, strict_encoder=False)
    # Encoder required by default: the decoder-only golden file is rejected, naming encoder tensors.
    with pytest.raises(VAECheckpointError, match=r"missing \d+: encoder\."):
        build_vae_from_state_dict(TINY, golden_sd)
    # A partial encoder is an error even when the encoder is optional.
    sd = dict(golden_sd, **{"encoder.conv_in.conv.weight": torch.zeros(32, 3, 3, 3)})
    with pytest.raises(VAECheckpointError, match=r"missing \d+: encoder\.conv_in\.conv\.bias"):
        build_vae_from_state_dict(TINY, sd, strict_encoder=False)
    # The wrong architecture is caught by shapes.
    with pytest.raises(VAECheckpointError, match="mis-shaped"):
        build_vae_from_state_dict(tiny_vae_config(8), golden_sd, strict_encoder=False)


def test_load_errors_on_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vae(tmp_path / "nope.pth", TINY)
    path = tmp_path / "bad.pth"
    torch.save({"vae": [1, 2]}, path)
    with pytest.raises(VAECheckpointError, match="bad.pth"):
        load_vae(path, TINY)


def test_load_dtype_and_full_round_trip(tmp_path):
    cfg = tiny_vae_config(8)
    vae = random_vae(cfg, seed=0)
    path = tmp_path / "full.pth"
    torch.save({"vae": vae.state_dict()}, path)
    back = load_vae(path, cfg, dtype=torch.bfloat16)
    assert back.encoder is not None
    assert back.decoder.conv_in.conv.weight.dtype == torch.bfloat16
    assert back.quantizer.lfq.mask.dtype == torch.int64
    z = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        out = back.decode(z)
        ref = vae.decode(z)
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 5e-2  # bf16 weights and activations through ~30 convolutions


# ------------------------------------------------------------------------------------------ random init, encoder


def test_random_vae_is_deterministic():
    cfg = tiny_vae_config(4)
    a, b, c = random_vae(cfg, 7), random_vae(cfg, 7), random_vae(cfg, 8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["decoder.conv_in.conv.weight"], sc["decoder.conv_in.conv.weight"])
    w = sa["decoder.up.0.block.0.conv1.conv.weight"]
    bound = 1 / math.sqrt(w[0].numel())
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.equal(sa["decoder.norm_out.norm.weight"], torch.ones(32))
    half = random_vae(cfg, 7, dtype=torch.bfloat16)
    assert torch.equal(half.state_dict()["decoder.conv_in.conv.weight"], sa["decoder.conv_in.conv.weight"].bfloat16())


def test_tiny_vae_config():
    assert tiny_vae_config(16).ch_mult == (1, 1, 2, 2) and tiny_vae_config(16).stride == 8
    golden_like = tiny_vae_config(6, stride=4)
    assert (golden_like.codebook_dim, golden_like.stride, golden_like.ch_mult, golden_like.base_ch) == (6, 4, (1, 1, 2), 32)
    assert golden_like == TINY  # dataclass equality ignores the name
    with pytest.raises(ValueError):
        tiny_vae_config(6, stride=6)


def test_encoder_and_multiscale_quantiser():
    cfg = tiny_vae_config(6, stride=4)
    vae = random_vae(cfg, seed=1)
    img = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sched = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6)]
    with torch.no_grad():
        z = vae.encoder(img)
        summed, bits = vae.encode(img, sched)
    assert z.shape == (2, 6, 6, 6)
    assert [tuple(b.shape) for b in bits] == [(2, h, w, 6) for _, h, w in sched]
    torch.testing.assert_close(summed, summed_codes_from_bits(bits, sched), atol=1e-6, rtol=0)
    # First scale: the sign of the area-averaged latent.
    assert torch.equal(bits[0][:, 0, 0], (z.mean(dim=(2, 3)) > 0).long())
    # Residual quantisation: the last (full-grid) scale takes the sign of what the earlier scales left.
    partial = None
    for si in range(3):
        partial, _ = accumulate_scale(partial, bits_to_code_map(bits[si]), si, sched, patchify=False)
    assert torch.equal(bits[3], (z - partial > 0).long().permute(0, 2, 3, 1))
    lfq = vae.quantizer.lfq
    idx = lfq.bits_to_indices(bits[3])
    assert idx.max() < 2**6
    assert torch.equal(lfq.indices_to_bits(idx), bits[3])
