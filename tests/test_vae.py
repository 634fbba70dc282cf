import json
import os

import pytest
import torch

from pfp.vae import PatchVAE, VideoVAE, WanVAE, check_video_frames


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops run faster on one thread


def _video(b, t, h, w, dtype=torch.float32):
    return (torch.rand(b, 3, t, h, w, dtype=dtype) * 2 - 1)


@pytest.mark.parametrize("s,tf", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 4), (3, 3)])
def test_patch_vae_round_trip_is_exact(s, tf):
    vae = PatchVAE(s, tf)
    assert isinstance(vae, VideoVAE)
    assert vae.latent_channels == 3 * s * s * tf
    for k in (0, 1, 3):
        t = 1 + tf * k
        x = _video(2, t, 2 * s, 3 * s)
        z = vae.encode(x)
        assert z.shape == (2, vae.latent_channels, 1 + k, 2, 3)
        assert vae.latent_frames(t) == 1 + k and vae.video_frames(1 + k) == t
        y = vae.decode(z)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.equal(y, x)
        # latent -> video -> latent is exact too for latents that came from a video
        assert torch.equal(vae.encode(y), z)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_patch_vae_keeps_dtype_and_is_exact(dtype):
    vae = PatchVAE(2, 1)
    x = _video(1, 3, 4, 6, dtype)
    z = vae.encode(x)
    assert z.dtype == dtype
    assert torch.equal(vae.decode(z), x)


def test_patch_vae_channel_layout():
    # channel order (rgb, dt, dy, dx); the causal first group repeats frame 0
    s, tf = 2, 2
    vae = PatchVAE(s, tf)
    x = _video(1, 5, 4, 6)
    z = vae.encode(x)
    for c in range(3):
        for dt in range(tf):
            for dy in range(s):
                for dx in range(s):
                    ch = ((c * tf + dt) * s + dy) * s + dx
                    # latent frame 0: frame 0 in every dt slot
                    assert torch.equal(z[0, ch, 0], x[0, c, 0, dy::s, dx::s])
                    # latent frame j >= 1 holds frames 1 + tf*(j-1) + dt
                    for j in (1, 2):
                        assert torch.equal(z[0, ch, j], x[0, c, 1 + tf * (j - 1) + dt, dy::s, dx::s])


def test_patch_vae_normalisation():
    vae = PatchVAE(2, 1, shift=0.25, scale=2.0)
    x = _video(1, 2, 4, 4)
    z = vae.encode(x)
    assert torch.allclose(z, (PatchVAE(2, 1).encode(x) - 0.25) * 2.0)
    assert torch.allclose(vae.decode(z), x, atol=1e-6)
    # a power-of-two scale with no shift is still bit exact
    v2 = PatchVAE(2, 1, scale=4.0)
    assert torch.equal(v2.decode(v2.encode(x)), x)


def test_patch_vae_gradient_flows():
    vae = PatchVAE(2, 2)
    x = _video(1, 3, 4, 4).requires_grad_()
    vae.decode(vae.encode(x) * 3).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 3.0))


def test_bad_frame_counts_name_valid_ones():
    vae = PatchVAE(2, 4)
    with pytest.raises(ValueError, match=r"7 frames.*1 \+ 4\*k.*use 5 or 9"):
        vae.encode(_video(1, 7, 4, 4))
    with pytest.raises(ValueError, match="use 1"):
        check_video_frames(0, 4)
    assert check_video_frames(9, 4) == 3
    with pytest.raises(ValueError, match="num_latent"):
        vae.video_frames(0)


def test_bad_shapes_and_args():
    vae = PatchVAE(4, 1)
    with pytest.raises(ValueError, match=r"10x16.*spatial factor 4.*8x16"):
        vae.encode(_video(1, 2, 10, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(3, 2, 8, 8))
    with pytest.raises(ValueError, match="float"):
        vae.encode(torch.zeros(1, 3, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 48, T', H', W'\]"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="spatial_factor"):
        PatchVAE(0)
    with pytest.raises(ValueError, match="temporal_factor"):
        PatchVAE(2, 1.5)
    with pytest.raises(ValueError, match="scale"):
        PatchVAE(2, scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        PatchVAE(2, scale=float("inf"))


# ---------------------------------------------------------------------------------------------
# WanVAE on a tiny, randomly initialised AutoencoderKLWan (no hub, nothing downloaded)
# ---------------------------------------------------------------------------------------------

def _tiny_wan(z_dim=16):
    try:
        from diffusers import AutoencoderKLWan
    except Exception as e:  # pragma: no cover - environment dependent
        pytest.skip(f"diffusers AutoencoderKLWan unavailable: {e}")
    torch.manual_seed(0)
    # dim_mult of 3 levels -> 4x spatial; one temporal downsample -> 2x temporal
    return AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True],
                            latents_mean=[0.1 * i for i in range(z_dim)],
                            latents_std=[1.0 + 0.1 * i for i in range(z_dim)]).eval()


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    model = _tiny_wan()
    root = tmp_path_factory.mktemp("wan")
    model.save_pretrained(root / "vae_only")
    model.save_pretrained(root / "pipeline" / "vae")  # diffusers pipeline layout
    return root


def test_wan_vae_factors_shapes_and_normalisation(tiny_wan_dir):
    vae = WanVAE.from_pretrained(tiny_wan_dir / "vae_only")
    assert isinstance(vae, VideoVAE)
    assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor) == (16, 4, 2)
    x = _video(1, 5, 8, 12)
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (1, 16, vae.latent_frames(5), 2, 3) == (1, 16, 3, 2, 3)
        # normalised with the config's mean/std, from the posterior mean
        mu = vae.model.encode(x).latent_dist.mode()
        mean = torch.tensor([0.1 * i for i in range(16)]).view(1, 16, 1, 1, 1)
        std = torch.tensor([1.0 + 0.1 * i for i in range(16)]).view(1, 16, 1, 1, 1)
        torch.testing.assert_close(z, (mu - mean) / std)
        y = vae.decode(z)
        assert y.shape == x.shape and vae.video_frames(3) == 5
        assert y.abs().max() <= 1
        # decode undoes the normalisation before the model's decoder
        torch.testing.assert_close(y, vae.model.decode(mu).sample.clamp(-1, 1))
        # a sampled encode differs from the mean but has the same shape
        zs = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        assert zs.shape == z.shape and not torch.equal(zs, z)


def test_wan_vae_loads_saved_weights_and_pipeline_layout(tiny_wan_dir):
    ref = _tiny_wan()
    a = WanVAE.from_pretrained(tiny_wan_dir / "vae_only")
    b = WanVAE.from_pretrained(tiny_wan_dir / "pipeline")  # finds vae/ by itself
    x = _video(1, 5, 8, 8)
    with torch.no_grad():
        za, zb, zr = a.encode(x), b.encode(x), WanVAE(ref).encode(x)
    assert torch.equal(za, zb) and torch.equal(za, zr)
    assert not any(p.requires_grad for p in a.parameters())


def test_wan_vae_bad_inputs(tiny_wan_dir, tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        WanVAE.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        WanVAE.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="AutoencoderKLWan"):
        WanVAE(torch.nn.Linear(2, 2))
    vae = WanVAE.from_pretrained(tiny_wan_dir / "vae_only")
    # temporal factor 2, but AutoencoderKLWan encodes frame 0 and then groups of 4 frames: T=3
    # would lose its last two frames to a partial group
    for t in (3, 4):
        with pytest.raises(ValueError, match=rf"T={t} frames; .* T must be 1 \+ 4k \(e\.g\. 1 or 5\)"):
            vae.encode(_video(1, t, 8, 8))
    with pytest.raises(ValueError, match="spatial factor 4"):
        vae.encode(_video(1, 5, 6, 8))
    with pytest.raises(ValueError, match=r"\[B, 16, T', H', W'\]"):
        vae.decode(torch.zeros(1, 4, 1, 2, 2))
    cfg = json.loads((tiny_wan_dir / "vae_only" / "config.json").read_text())
    assert cfg["z_dim"] == 16 and os.path.isfile(tiny_wan_dir / "vae_only" / "diffusion_pytorch_model.safetensors")


def test_wan22_style_residual_patchified_vae():
    # Wan 2.2's VAE patchifies 2x2 before the encoder: spatial factor = 2**(levels-1) * patch_size
    try:
        from diffusers import AutoencoderKLWan
    except Exception as e:  # pragma: no cover - environment dependent
        pytest.skip(f"diffusers AutoencoderKLWan unavailable: {e}")
    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True], is_residual=True, patch_size=2,
                             in_channels=12, out_channels=12, latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
    vae = WanVAE(model.eval())
    assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor) == (8, 8, 2)
    x = _video(1, 5, 16, 16)
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (1, 8, 3, 2, 2)
        assert vae.decode(z).shape == x.shape


# ---------------------------------------------------------------------------------------------
# streams: chunk by chunk equals one call
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tf", [1, 4])
def test_patch_vae_streams_are_exact(tf):
    from pfp.vae import decode_stream, encode_stream
    vae = PatchVAE(2, tf, scale=2.0)
    z = torch.randn(1, vae.latent_channels, 6, 3, 3)
    full = vae.decode(z)
    ds = decode_stream(vae)
    parts = [ds.decode(c) for c in z.split([2, 1, 3], dim=2)]
    assert [p.shape[2] for p in parts] == [1 + tf, tf, 3 * tf]  # first chunk: 1 + tf*(n-1)
    assert torch.equal(torch.cat(parts, 2), full)
    es = encode_stream(vae)
    outs = [es.encode(c) for c in full.split([1, 2, 3] if tf == 1 else [1, 2, 5, 13], dim=2)]
    assert torch.equal(torch.cat(outs, 2), vae.encode(full))


def test_wan_vae_streams_match_full_calls(tmp_path):
    from _tiny_pfp import save_tiny_wan_vae
    from pfp.vae import _WanDecodeStream
    save_tiny_wan_vae(tmp_path / "vae")
    vae = WanVAE.from_pretrained(tmp_path / "vae")
    assert (vae.spatial_factor, vae.temporal_factor) == (4, 4)
    torch.manual_seed(0)
    z = torch.randn(1, 4, 5, 3, 2)
    with torch.no_grad():
        full = vae.decode(z)
        assert full.shape == (1, 3, 17, 12, 8)
        ds = vae.decode_stream()
        assert isinstance(ds, _WanDecodeStream)  # the feature cache, not a re-decode
        parts = [ds.decode(c) for c in z.split([2, 1, 2], dim=2)]
        assert [p.shape[2] for p in parts] == [5, 4, 8]
        torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=1e-5)  # per-frame 1x1x1 conv rounding
        ref = vae.encode(full)
        es = vae.encode_stream()
        outs = [es.encode(c) for c in full.split([3, 0, 6, 1, 7], dim=2)]
        assert [o.shape[2] for o in outs] == [1, 0, 2, 0, 2] and es.pending_frames == 0
        torch.testing.assert_close(torch.cat(outs, 2), ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="start a new stream"):
            ds.decode(torch.zeros(2, 4, 1, 3, 2))


def test_wan22_residual_vae_streams_match_full_calls():
    # Wan 2.2's VAE (residual up/down blocks, 2x2 patchify around the encoder and decoder):
    # chunked decoding and encoding equal one call on the whole video, as for Wan 2.1's
    from pfp.vae import _WanDecodeStream
    vae = _tiny_wan_decoders()["wan22"]
    assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor) == (8, 8, 2)
    z = torch.randn(1, 8, 5, 3, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = vae.decode(z)
        assert full.shape == (1, 3, 9, 24, 16)
        ds = vae.decode_stream()
        assert isinstance(ds, _WanDecodeStream)
        parts = [ds.decode(c) for c in z.split([2, 1, 2], dim=2)]
        assert [p.shape[2] for p in parts] == [3, 2, 4]
        torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=1e-5)
        ref = vae.encode(full)
        es = vae.encode_stream()
        outs = [es.encode(c) for c in full.split([3, 0, 2, 4], dim=2)]
        assert es.pending_frames == 0
        torch.testing.assert_close(torch.cat(outs, 2), ref, atol=1e-5, rtol=1e-5)


def test_streams_of_a_vae_without_stream_methods_recompute_exactly():
    from pfp.vae import decode_stream, encode_stream

    class Plain:  # implements only the VideoVAE protocol
        def __init__(self):
            self.inner = PatchVAE(2, 2)
            self.latent_channels, self.spatial_factor, self.temporal_factor = 24, 2, 2

        def encode(self, v):
            return self.inner.encode(v)

        def decode(self, z):
            return self.inner.decode(z)

    vae = Plain()
    z = torch.randn(1, 24, 4, 2, 2)
    full = vae.decode(z)
    ds = decode_stream(vae)
    assert torch.equal(torch.cat([ds.decode(c) for c in z.split([1, 3], 2)], 2), full)
    es = encode_stream(vae)
    assert torch.equal(torch.cat([es.encode(c) for c in full.split([2, 2, 3], 2)], 2), vae.encode(full))


def test_tiled_decode_stream_is_exact_for_a_local_decoder_and_streams_exactly():
    from pfp.vae import PatchVAE, TiledDecodeStream, decode_stream
    torch.manual_seed(0)
    vae = PatchVAE(spatial_factor=2, temporal_factor=2, scale=2.0)
    lat = torch.randn(2, vae.latent_channels, 5, 9, 7)    # odd sizes: uneven tiles
    whole = decode_stream(vae).decode(lat)
    for tiles, overlap in ((2, 2), (3, 1), (1, 0), (2, 0)):
        stream = TiledDecodeStream(vae, tiles, overlap)
        parts = [stream.decode(lat[:, :, :2]), stream.decode(lat[:, :, 2:3]), stream.decode(lat[:, :, 3:])]
        # the patch decoder is local: tiles give the untiled frames, to rounding of the blend
        torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="tiles must be an int >= 1"):
        TiledDecodeStream(vae, 0)
    with pytest.raises(ValueError, match="overlap must be an int >= 0"):
        TiledDecodeStream(vae, 2, -1)


def _tiny_wan_decoders():
    """A Wan 2.1-style VAE with four decoder levels (8x space, 4x time) and a Wan 2.2-style
    residual, patchified one (8x space with its 2x2 patches, 2x time)."""
    try:
        from diffusers import AutoencoderKLWan
    except Exception as e:  # pragma: no cover - environment dependent
        pytest.skip(f"diffusers AutoencoderKLWan unavailable: {e}")
    torch.manual_seed(0)
    wan21 = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True, True], latents_mean=[0.05 * i for i in range(4)],
                             latents_std=[1.0 + 0.1 * i for i in range(4)]).eval()
    wan22 = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True], is_residual=True, patch_size=2,
                             in_channels=12, out_channels=12, latents_mean=[0.0] * 8, latents_std=[1.0] * 8).eval()
    return {"wan21": WanVAE(wan21), "wan22": WanVAE(wan22)}


@pytest.mark.parametrize("kind", ["wan21", "wan22"])
def test_wan_tiled_decode_gives_the_untiled_frames_and_streams(kind):
    # The decoder's tail (from up_blocks[split]) runs tile by tile, each tile reading a halo as
    # wide as the tail's receptive field: the frames equal the untiled decode up to float
    # rounding, for any tile count, split and chunk plan, odd and single-pixel latents included.
    from pfp.vae import decode_stream
    vae = _tiny_wan_decoders()[kind]
    n_up = len(vae.model.decoder.up_blocks)
    g = torch.Generator().manual_seed(3)
    for batch, h, w in ((1, 11, 6), (1, 1, 3), (2, 4, 4)):
        lat = torch.randn(batch, vae.latent_channels, 4, h, w, generator=g)
        with torch.no_grad():
            whole = decode_stream(vae).decode(lat)
            for tiles in (1, 2, 3):
                for split in (None, *range(n_up + 1)):
                    stream = vae.tiled_decode_stream(tiles, split)
                    assert stream.split == (n_up - 2 if split is None else split)
                    parts = [stream.decode(c) for c in lat.split([1, 2, 1], dim=2)]
                    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-5)
                    # the tiles' own pixels cover the split level's grid once
                    rows = sorted({own_rows for _, _, own_rows, _, _ in stream._tiles})
                    cols = sorted({own_cols for _, _, _, own_cols, _ in stream._tiles})
                    assert len(stream._tiles) == len(rows) * len(cols)
                    for spans in (rows, cols):
                        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
                    patch = vae.model.config.patch_size or 1   # Wan 2.2 unpatchifies the decoder's output
                    assert (rows[-1][1] * stream.factor * patch, cols[-1][1] * stream.factor * patch) == whole.shape[3:]


@pytest.mark.parametrize("kind", ["wan21", "wan22"])
def test_wan_tiled_decode_halo_is_the_tails_reach(kind):
    # One pixel less of halo and the tiles' edges read zero padding where the whole frame has
    # pixels: the frames move well past rounding. So the halo is needed, and the test above can fail.
    from pfp.vae import decode_stream
    vae = _tiny_wan_decoders()[kind]
    lat = torch.randn(1, vae.latent_channels, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = decode_stream(vae).decode(lat)
        for split in range(len(vae.model.decoder.up_blocks)):
            stream = vae.tiled_decode_stream(2, split)
            assert stream.halo >= 1
            stream.halo -= 1
            assert (stream.decode(lat) - whole).abs().max() > 1e-5, split
    with pytest.raises(ValueError, match="tiles must be an int >= 1"):
        vae.tiled_decode_stream(0)
    n_up = len(vae.model.decoder.up_blocks)
    with pytest.raises(ValueError, match=f"split must be an int in 0..{n_up}"):
        vae.tiled_decode_stream(2, n_up + 1)


def test_tiled_decode_stream_takes_the_vaes_own_exact_tiling():
    from pfp.vae import TiledDecodeStream, _WanTiledDecodeStream, tiled_decode_stream
    vae = _tiny_wan_decoders()["wan22"]
    assert isinstance(tiled_decode_stream(vae, 2, 4), _WanTiledDecodeStream)
    assert type(tiled_decode_stream(PatchVAE(2), 2, 4)) is TiledDecodeStream


# ----------------------------------------------------------------------------------------------
# HunyuanVideo's VAE: whole-input transforms, windowed streams
# ----------------------------------------------------------------------------------------------
def _tiny_hunyuan_vae(warmup):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLHunyuanVideo

    from pfp.vae import HunyuanVAE
    torch.manual_seed(0)
    model = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                      norm_num_groups=4).eval()
    return HunyuanVAE(model, warmup=warmup)


def test_hunyuan_vae_matches_diffusers_scaled_latents():
    vae = _tiny_hunyuan_vae(2)
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (8, 4, 4)
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        assert z.shape == (1, 4, 3, 4, 4)
        want = vae.model.encode(video).latent_dist.mode() * vae.model.config.scaling_factor
        torch.testing.assert_close(z, want)
        out = vae.decode(z)
        torch.testing.assert_close(out, vae.model.decode(z / vae.model.config.scaling_factor).sample.clamp(-1, 1))
    assert out.shape == video.shape


@pytest.mark.parametrize("warmup", [1, 3, None])
def test_hunyuan_vae_streams_are_windows_of_bounded_cost(warmup):
    # each chunk is decoded after at most `warmup` latent frames before it (None: all) and its own
    # frames are the last ones of that decode; encoding likewise
    vae = _tiny_hunyuan_vae(warmup)
    seen = []
    real = vae.model.decode
    vae.model.decode = lambda z, **kw: seen.append(z.shape[2]) or real(z, **kw)
    lat = torch.randn(1, 4, 6, 4, 4)
    cuts = [(0, 2), (2, 3), (3, 6)]
    with torch.no_grad():
        stream = vae.decode_stream()
        for a, b in cuts:
            got = stream.decode(lat[:, :, a:b])
            start = 0 if warmup is None else max(0, a - warmup)
            window = vae.decode(lat[:, :, start:b])
            want = window if a == 0 else window[:, :, window.shape[2] - 4 * (b - a):]
            torch.testing.assert_close(got, want)
        assert stream.video_frames_seen == 1 + 4 * 5
        assert max(seen[::2]) == (6 if warmup is None else min(6, 3 + warmup))   # the stream's own calls
        video = torch.rand(1, 3, 21, 32, 32) * 2 - 1
        enc = vae.encode_stream()
        parts = [enc.encode(video[:, :, a:b]) for a, b in ((0, 3), (3, 10), (10, 21))]
        assert [p.shape[2] for p in parts] == [1, 2, 3] and enc.pending_frames == 0
        if warmup is None:   # each new latent frame: the last of an encode of everything so far
            torch.testing.assert_close(parts[-1], vae.encode(video)[:, :, -3:])
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        type(vae)(vae.model, warmup=0)


def test_wan_tiled_decode_refuses_a_tail_it_cannot_bound():
    # a layer of unknown reach after the split (here an attention over the frame) would make the
    # tiles differ from the whole frame: refused, naming it
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock
    vae = _tiny_wan_decoders()["wan21"]
    block = vae.model.decoder.up_blocks[-1]
    block.add_module("extra_attention", WanAttentionBlock(8))
    with pytest.raises(ValueError, match=r"up_blocks\[2:\] hold layers whose spatial reach is not known here "
                                         r"\(WanAttentionBlock\); pass a later split"):
        vae.tiled_decode_stream(2)
    del block.extra_attention
    block.add_module("frame_norm", torch.nn.GroupNorm(2, 8))   # a norm over the whole frame
    with pytest.raises(ValueError, match=r"\(GroupNorm\)"):
        vae.tiled_decode_stream(2)
    vae.tiled_decode_stream(2, split=len(vae.model.decoder.up_blocks))   # nothing after the split: fine
