"""Image-to-video as Wan 2.2 TI2V does it (diffusers' WanImageToVideoPipeline with expand_timesteps):
the chunk's first latent frame is held to the image's latent, its tokens at timestep 0."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pfp.sampler import sample, timestep_schedule

from _tiny_pfp import tiny_config, tiny_wan_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_sigmas_scheduler(shift: float):
    """diffusers' flow-match Euler scheduler on our sigmas (linear from 1 to 0, then shifted as
    ours are): the pipelines pass it only a step count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class SameSigmas(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=torch.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist(),
                                  device=device)
    return SameSigmas(shift=shift)


def _tiny_diffusers_wan_vae():
    """A tiny random diffusers AutoencoderKLWan (4 latent channels, 4x space and time)."""
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                            scale_factor_spatial=4, scale_factor_temporal=4,
                            latents_mean=[0.05 * i for i in range(4)],
                            latents_std=[1.0 + 0.1 * i for i in range(4)]).eval()


def test_per_frame_timesteps_match_diffusers_per_token_timesteps():
    # WanImageToVideoPipeline(expand_timesteps=True) calls the transformer with one timestep per
    # token: 0 on the first latent frame, t elsewhere; ours takes them per token frame
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel
    bb = tiny_wan_backbone()
    upstream = WanTransformer3DModel.from_config(bb.transformer.config).eval()
    upstream.load_state_dict(bb.transformer.state_dict())
    torch.manual_seed(0)
    x, text = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 5, 16)
    t = 0.7
    mask = torch.ones(1, 1, 3, 4, 4)
    mask[:, :, 0] = 0
    per_token = (mask[0][0][:, ::2, ::2] * t * 1000).flatten().unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        want = upstream(x, per_token, text, return_dict=False)[0]
        got = bb(x, torch.tensor([[0.0, t, t]]).expand(2, -1), text)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_the_first_frame_is_held_and_the_loop_is_the_pipelines():
    bb = tiny_wan_backbone()
    torch.manual_seed(1)
    text, uncond = torch.randn(1, 5, 16), torch.zeros(1, 5, 16)
    image = torch.randn(1, 4, 1, 4, 4)
    steps, cfg = 4, 3.0
    got = sample(bb, (1, 4, 3, 4, 4), text, None, uncond_text=uncond, steps=steps, cfg=cfg, seed=0,
                 first_frame=image)
    assert torch.equal(got[:, :, :1], image)
    # the pipeline's loop: the model input holds the image in frame 0, the step moves all frames
    ts = timestep_schedule(steps, 3.0)
    x = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(steps):
            xin = torch.cat([image, x[:, :, 1:]], 2)
            tt = torch.tensor([[0.0, float(ts[i]), float(ts[i])]]).expand(2, -1)
            v = bb(torch.cat([xin, xin]), tt, torch.cat([text, uncond])).float()
            vc, vu = v.chunk(2)
            x = x + (ts[i + 1] - ts[i]) * (vu + cfg * (vc - vu))
    x = torch.cat([image, x[:, :, 1:]], 2)
    torch.testing.assert_close(got, x, atol=1e-6, rtol=1e-5)
    plain = sample(bb, (1, 4, 3, 4, 4), text, None, uncond_text=uncond, steps=steps, cfg=cfg, seed=0)
    assert not torch.allclose(plain[:, :, 1:], got[:, :, 1:])   # the image conditions the other frames


def test_bad_first_frame_names_the_shape():
    bb = tiny_wan_backbone()
    with pytest.raises(ValueError, match=r"first_frame must be \[1 or 1, 4, 1, 4, 4\] latents, got \(1, 4, 2, 4, 4\)"):
        sample(bb, (1, 4, 3, 4, 4), torch.randn(1, 5, 16), steps=1, first_frame=torch.randn(1, 4, 2, 4, 4))


def test_generate_starts_the_video_from_the_image():
    from pfp.generate import InputError, generate
    from pfp.text import Storyboard
    from pfp.weights import build_model
    torch.manual_seed(0)
    model = build_model(tiny_config())   # the exact PatchVAE: the image comes back as it went in
    story = Storyboard.single("a red circle on a blue background", 1.5)
    image = torch.rand(3, 32, 32) * 2 - 1
    res = generate(model, story, 1.5, steps=2, progress=False, image=image)
    assert (res.video[:, 0] - image).abs().max() < 1e-5
    plain = generate(model, story, 1.5, steps=2, progress=False)
    assert (plain.video[:, 0] - image).abs().max() > 0.1
    with pytest.raises(InputError, match=r"image must be a \[3, 32, 32\] frame"):
        generate(model, story, 1.5, steps=2, progress=False, image=torch.zeros(3, 16, 16))


def test_cli_image_to_video_and_its_bad_input(tmp_path):
    import os
    import subprocess
    import sys
    pytest.importorskip("av")
    from PIL import Image
    from pfp.weights import build_model, save_weights
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_weights(build_model(tiny_config()), str(weights))
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "not.png").write_text("not a picture")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pfp.generate", "--checkpoint", str(weights), "--seconds", "1",
                               "--steps", "2", "--quiet", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    r = run("--image", "red.png", "--out", "v.mp4")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v.mp4").is_file()
    for image, expect in (("missing.png", "--image missing.png: no such file"),
                          ("not.png", "--image not.png is not a picture PIL can read")):
        r = run("--image", image, "--out", "w.mp4")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert expect in lines[0] and not (tmp_path / "w.mp4").exists()


def test_matches_diffusers_wan_image_to_video_pipeline():
    # upstream parity: diffusers' WanImageToVideoPipeline with expand_timesteps (Wan 2.2 TI2V) on the
    # same image, noise, text states and sigmas
    pytest.importorskip("diffusers")
    from diffusers import WanImageToVideoPipeline
    from diffusers import WanTransformer3DModel

    from pfp.backbones import WanBackbone
    from pfp.vae import WanVAE
    from _tiny_pfp import TINY_WAN
    steps, shift, cfg = 5, 3.0, 2.5


    torch.manual_seed(0)
    vae = _tiny_diffusers_wan_vae()
    upstream = WanTransformer3DModel(**TINY_WAN).eval()
    with torch.no_grad():
        upstream.proj_out.weight.normal_(0, 0.05)
    twin = WanTransformer3DModel.from_config(upstream.config).eval()
    twin.load_state_dict(upstream.state_dict())
    ours = WanBackbone(twin)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=_same_sigmas_scheduler(shift),
                                   transformer=upstream, expand_timesteps=True)
    picture = torch.rand(1, 3, 16, 16)                    # in [0, 1], as the pipeline takes tensors
    image = picture * 2.0 - 1.0                            # its normalisation, ours in [-1, 1]
    text, uncond = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    shape = (1, 4, 3, 4, 4)                               # 9 frames of 16x16
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    want = pipe(image=picture, prompt_embeds=text, negative_prompt_embeds=uncond, latents=noise.clone(), height=16,
                width=16, num_frames=9, num_inference_steps=steps, guidance_scale=cfg, output_type="latent").frames
    with torch.no_grad():
        first = WanVAE(vae).encode(image[:, :, None])
    got = sample(ours, shape, text, None, uncond_text=uncond, steps=steps, shift=shift, cfg=cfg, seed=4,
                 first_frame=first)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Wan 2.1 I2V: [latent ; mask ; image latent] input and an image cross-attention
# ----------------------------------------------------------------------------------------------
TINY_WAN_I2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12,
                    out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=24, added_kv_proj_dim=16)


def _tiny_i2v_pair():
    """A tiny random Wan 2.1 I2V transformer (weights not near zero, so every part shows) and our
    backbone over a twin of it."""
    from diffusers import WanTransformer3DModel
    from pfp.backbones import WanBackbone
    torch.manual_seed(0)
    upstream = WanTransformer3DModel(**TINY_WAN_I2V).eval()
    with torch.no_grad():
        for p in upstream.parameters():
            p.normal_(0, 0.2)
    twin = WanTransformer3DModel.from_config(upstream.config).eval()
    twin.load_state_dict(upstream.state_dict())
    return upstream, WanBackbone(twin)


def test_wan_i2v_backbone_matches_diffusers_forward_in_both_context_modes():
    pytest.importorskip("diffusers")
    from pfp.compressor import Context
    upstream, ours = _tiny_i2v_pair()
    x, cond, t = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 8, 3, 4, 4), torch.rand(2)
    text, image = torch.randn(2, 512, 16), torch.randn(1, 7, 24)   # diffusers splits image | 512 text tokens
    with torch.no_grad():
        want = upstream(torch.cat([x, cond], 1), t * 1000, text, encoder_hidden_states_image=image.expand(2, -1, -1),
                        return_dict=False)[0]
        got = ours(x, t, text, None, condition=cond, image=image)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        # without the image the output changes: the image cross-attention is live
        assert not torch.allclose(ours(x, t, text, None, condition=cond, image=image * 0), got)
        # a context reads neither image nor condition: cached and joint modes agree with each other
        ctx = Context(torch.randn(1, 6, 16), torch.tensor([[t_, 0, c] for t_ in range(3) for c in range(2)]))
        cached = ours(x, t, text, ours.cache_context(ctx), condition=cond, image=image, t_start=3)
        assert not torch.allclose(cached, got)
        ours.context_mode = "joint"
        joint = ours(x, t, text, ctx, condition=cond, image=image, t_start=3)
        ours.context_mode = "cached"
        assert joint.shape == cached.shape and torch.isfinite(joint).all()


def test_wan_i2v_loaded_in_bf16_matches_diffusers_within_one_bf16_step(tmp_path):
    # Wan 2.1 I2V from_pretrained(torch_dtype=bf16), image cross-attention and condition channels
    # included: diffusers' own bf16 forward, within one bf16 step at the output's magnitude
    pytest.importorskip("diffusers")
    import math

    from diffusers import WanTransformer3DModel

    from pfp.backbones import WanBackbone
    upstream, _ = _tiny_i2v_pair()
    upstream.save_pretrained(tmp_path / "i2v")
    ours = WanBackbone.from_pretrained(str(tmp_path / "i2v"), torch_dtype=torch.bfloat16).eval()
    up = WanTransformer3DModel.from_pretrained(str(tmp_path / "i2v"), torch_dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(2)
    x, cond, t = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 8, 3, 4, 4, generator=g), torch.tensor([0.3, 0.9])
    text, image = torch.randn(2, 512, 16, generator=g), torch.randn(1, 7, 24, generator=g)
    with torch.no_grad():
        want = up(torch.cat([x, cond], 1).bfloat16(), t * 1000, text.bfloat16(),
                  encoder_hidden_states_image=image.expand(2, -1, -1).bfloat16(), return_dict=False)[0].float()
        got = ours(x, t, text, None, condition=cond, image=image).float()
    one_step = torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(want.abs().max().item()))
    assert (got - want).abs().max() <= one_step, ((got - want).abs().max(), one_step)


def test_wan_i2v_compressor_branch_patchifies_the_latent_with_a_zero_condition():
    pytest.importorskip("diffusers")
    _, ours = _tiny_i2v_pair()
    lr = torch.randn(1, 4, 2, 4, 4)
    patch = ours.patch_embed
    assert patch.patch_size == (1, 2, 2) and patch is ours.patch_embed   # one wrapper, kept
    with torch.no_grad():
        want = ours.patch_embedding(torch.cat([lr, torch.zeros(1, 8, 2, 4, 4)], 1))
        torch.testing.assert_close(patch(lr), want)
    assert set(ours.state_dict()) == {"transformer." + k for k in ours.transformer.state_dict()}  # named once


def test_wan_i2v_inputs_are_checked():
    pytest.importorskip("diffusers")
    _, ours = _tiny_i2v_pair()
    x, text = torch.randn(1, 4, 3, 4, 4), torch.randn(1, 512, 16)
    cond, image = torch.randn(1, 8, 3, 4, 4), torch.randn(1, 7, 24)
    with pytest.raises(ValueError, match="takes 8 condition channels"):
        ours(x, torch.rand(1), text, image=image)
    with pytest.raises(ValueError, match=r"condition must be \[1 or 1, 8, 3, 4, 4\]"):
        ours(x, torch.rand(1), text, condition=cond[:, :4], image=image)
    with pytest.raises(ValueError, match="pass image="):
        ours(x, torch.rand(1), text, condition=cond)
    plain = tiny_wan_backbone()
    with pytest.raises(ValueError, match="takes no condition"):
        plain(x, torch.rand(1), torch.randn(1, 5, 16), condition=cond)
    with pytest.raises(ValueError, match="no image cross-attention"):
        plain(x, torch.rand(1), torch.randn(1, 5, 16), image=image)


def test_wan_i2v_sampling_matches_diffusers_wan_image_to_video_pipeline():
    # upstream parity: WanImageToVideoPipeline (Wan 2.1 I2V: [latent ; mask ; image latent] input,
    # image cross-attention) on the same picture, image states, noise, text states and sigmas
    pytest.importorskip("diffusers")
    from diffusers import WanImageToVideoPipeline
    from pfp.i2v import wan_i2v_condition
    from pfp.vae import WanVAE
    steps, shift, cfg = 4, 3.0, 2.5

    upstream, ours = _tiny_i2v_pair()
    torch.manual_seed(0)
    vae = _tiny_diffusers_wan_vae()
    image_states = torch.randn(1, 7, 24)

    class ImageEncoder(torch.nn.Module):   # stands in for CLIP: the pipeline reads hidden_states[-2]
        def __init__(self):
            super().__init__()
            self.device, self.dtype = torch.device("cpu"), torch.float32   # what the pipeline asks of a model

        def forward(self, pixel_values=None, output_hidden_states=True):
            return SimpleNamespace(hidden_states=(image_states, torch.zeros_like(image_states)))

    def image_processor(images, return_tensors="pt"):
        from transformers import BatchFeature
        return BatchFeature({"pixel_values": torch.zeros(1, 3, 4, 4)})
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=_same_sigmas_scheduler(shift),
                                   transformer=upstream, image_encoder=ImageEncoder(), image_processor=image_processor)
    picture = torch.rand(1, 3, 16, 16)
    text, uncond = torch.randn(1, 512, 16), torch.randn(1, 512, 16)
    shape = (1, 4, 3, 4, 4)                               # 9 frames of 16x16
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    want = pipe(image=picture, prompt_embeds=text, negative_prompt_embeds=uncond, latents=noise.clone(), height=16,
                width=16, num_frames=9, num_inference_steps=steps, guidance_scale=cfg, output_type="latent").frames
    with torch.no_grad():
        condition = wan_i2v_condition(WanVAE(vae), picture * 2.0 - 1.0, 9)
    assert condition.shape == (1, 8, 3, 4, 4) and torch.equal(condition[:, :4, 0], torch.ones(1, 4, 4, 4))
    got = sample(ours, shape, text, None, uncond_text=uncond, steps=steps, shift=shift, cfg=cfg, seed=4,
                 condition=condition, image=image_states)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# generate with a Wan 2.1 I2V model: CLIP states and the condition, chunk by chunk
# ----------------------------------------------------------------------------------------------
TINY_CLIP = dict(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                 patch_size=8)


def _i2v_model(vae_path, dit=None, image_encoder=None):
    import dataclasses
    from _tiny_pfp import wan_config
    from pfp.weights import build_model
    cfg = dataclasses.replace(wan_config(vae_path), dit=dit or {"kind": "wan", "config": TINY_WAN_I2V},
                              image_encoder=image_encoder or {"kind": "clip", "config": TINY_CLIP})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.normal_(0, 0.1)
        model.compressor.proj.weight.normal_(0, 0.1)
    return model


def test_generate_with_a_wan_i2v_model_conditions_the_first_chunk_on_the_picture(wan_vae_dir, monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import pfp.sampler
    from pfp.generate import InputError, generate
    from pfp.i2v import wan_i2v_condition
    from pfp.text import Storyboard
    model = _i2v_model(wan_vae_dir)
    assert model.frozen_prefixes()[-1] == "image_encoder." and not any(
        k.startswith("image_encoder.") for k in model.trainable_state_dict())
    story = Storyboard.single("a red circle", 3.0)
    picture = torch.rand(3, 32, 32) * 2 - 1
    seen = []
    real = pfp.sampler.sample

    def spy(*args, **kwargs):
        seen.append((kwargs.get("condition"), kwargs.get("image")))
        return real(*args, **kwargs)
    monkeypatch.setattr(pfp.sampler, "sample", spy)
    res = generate(model, story, 3.0, steps=2, progress=False, image=picture)
    assert len(seen) == 3 and torch.isfinite(res.video).all()
    vae = model.vae
    with torch.no_grad():
        first = wan_i2v_condition(vae, picture[None], vae.video_frames(2))
        blank = wan_i2v_condition(vae, picture[None], vae.video_frames(2), given=False)
        states = model.encode_image(picture)
    torch.testing.assert_close(seen[0][0], first)
    for cond, _ in seen[1:]:
        torch.testing.assert_close(cond, blank)
        assert (cond[:, :4] == 0).all()                  # no frame given after the first chunk
    for _, image in seen:
        torch.testing.assert_close(image, states)
    assert states.shape == (1, 5, 24)                    # CLS + 2x2 patches of a 16-pixel crop
    other = generate(model, story, 3.0, steps=2, progress=False, image=-picture)
    assert not torch.allclose(other.video, res.video)
    with pytest.raises(InputError, match="image-to-video.*give image="):
        generate(model, story, 3.0, steps=2, progress=False)


def test_an_i2v_model_needs_its_image_encoder(wan_vae_dir):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="image cross-attention.*give it its image encoder"):
        _i2v_model(wan_vae_dir, image_encoder={"kind": "none"})
    with pytest.raises(ValueError, match="has no image cross-attention"):
        _i2v_model(wan_vae_dir, dit={"kind": "wan", "config": {**TINY_WAN_I2V, "image_dim": None,
                                                                   "added_kv_proj_dim": None, "in_channels": 4}})
    with pytest.raises(ValueError, match="makes states of width 32 but the backbone's image cross-attention takes 24"):
        _i2v_model(wan_vae_dir, image_encoder={"kind": "clip", "config": {**TINY_CLIP, "hidden_size": 32}})


def test_clip_image_encoder_preprocesses_as_clips_processor_does():
    pytest.importorskip("transformers")
    from pfp.image_encoder import CLIP_MEAN, CLIP_STD, CLIPImageEncoder
    enc = CLIPImageEncoder.from_config(**TINY_CLIP)
    picture = torch.rand(3, 20, 40) * 2 - 1              # wide: the shorter side goes to 16, then a center crop
    pixels = enc.preprocess(picture)
    assert pixels.shape == (1, 3, 16, 16)
    resized = torch.nn.functional.interpolate((picture[None] + 1) / 2, size=(16, 32), mode="bicubic",
                                              align_corners=False, antialias=True).clamp(0, 1)[..., 8:24]
    want = (resized - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, want)
    with pytest.raises(ValueError, match=r"picture must be \[3, H, W\]"):
        enc(torch.rand(4, 8, 8))


def test_the_planner_traces_an_i2v_model_with_its_image_encoder(wan_vae_dir):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from pfp.memory import trace_model
    model = _i2v_model(wan_vae_dir)
    plain = trace_model(model, history_seconds=2.0)
    encoder_bytes = sum(t.numel() * t.element_size() for t in model.image_encoder.parameters())
    assert plain.text >= encoder_bytes and plain.transient["denoise"] > 0


def test_two_i2v_experts_route_the_condition_per_sample():
    # Wan 2.2 I2V A14B: two experts that read condition channels; a mixed batch routes each
    # sample's condition to its expert
    pytest.importorskip("diffusers")
    from pfp.backbones.experts import ExpertPair
    _, high = _tiny_i2v_pair()
    _, low = _tiny_i2v_pair()
    with torch.no_grad():
        for p in low.parameters():
            p.mul_(-1.0)
    pair = ExpertPair(high, low, 0.5)
    assert pair.condition_channels == 8 and pair.takes_image
    x, cond = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 8, 3, 4, 4)
    text, image = torch.randn(2, 512, 16), torch.randn(2, 7, 24)
    t = torch.tensor([0.9, 0.2])
    with torch.no_grad():
        got = pair(x, t, text, None, condition=cond, image=image)
        torch.testing.assert_close(got[:1], high(x[:1], t[:1], text[:1], None, condition=cond[:1], image=image[:1]))
        torch.testing.assert_close(got[1:], low(x[1:], t[1:], text[1:], None, condition=cond[1:], image=image[1:]))


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_an_i2v_model_trains_with_the_conditions_generation_gives(wan_vae_dir, tmp_path, mode, monkeypatch):
    # finetune: a clip's chunk 0 is conditioned on the clip's first frame, later chunks on no frame;
    # pretraining's retrieved frames on no frame; every step reads the first frame's CLIP states
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import dataclasses
    import pfp.train.objectives as objectives
    from _tiny_pfp import wan_config, write_config
    from pfp.train import TrainArgs, train
    cfg = dataclasses.replace(wan_config(wan_vae_dir), dit={"kind": "wan", "config": TINY_WAN_I2V},
                              image_encoder={"kind": "clip", "config": TINY_CLIP})
    path = write_config(tmp_path / "i2v.json", cfg)
    seen = []
    real = objectives.i2v_inputs

    def spy(model, backbone, batch, frames, given, device):
        out = real(model, backbone, batch, frames, given, device)
        seen.append((bool(torch.as_tensor(given).all()), out["condition"][:, :4].amax().item(), out["image"].shape))
        return out
    monkeypatch.setattr(objectives, "i2v_inputs", spy)
    out = train(TrainArgs(mode=mode, config=path, out=str(tmp_path / "run"), steps=3, batch_size=2, clip_seconds=3.0,
                          workers=0, progress=False, save_every=3, log_every=1, lr=1e-3, warmup=0,
                          **({"lora_rank": 4} if mode == "finetune" else {})))
    assert seen and all(shape == (2, 5, 24) for _, _, shape in seen)
    assert all(mask_max == (1.0 if given else 0.0) for given, mask_max, _ in seen), seen
    if mode == "pretrain":
        assert not any(given for given, _, _ in seen)
    assert out is not None


def test_the_wan21_i2v_preset_plans_without_weights_and_names_its_image_encoder(tmp_path):
    from pfp import memory
    gib = 1 << 30
    p = memory.preset("wan21-i2v-14b-480p")
    trace = memory.trace_preset(p, history_seconds=20)
    # 16.4 B parameters in bf16: the 14 B transformer and, per block, the image K/V projections
    # (2 x 5120 x 5120 in each of 40); CLIP ViT-H/14's 632 M count with UMT5-XXL's 5.7 B
    assert 30.3 < trace.transformer / gib < 30.7, trace.transformer / gib
    assert 11.6 < trace.text / gib < 11.9, trace.text / gib
    assert memory.choose(trace, 24 * gib).fits and memory.choose(trace, 80 * gib).choices["weights"] == "native"
    cfg = memory.preset_config(p, str(tmp_path))
    assert cfg.image_encoder == {"kind": "clip", "path": str(tmp_path), "subfolder": "image_encoder", "dtype": "bf16"}


def test_the_wan21_i2v_preset_plans_a_training_step_without_weights():
    # its image encoder built from the preset's keys (the planner has no folder), in bf16, and the
    # step traced with the condition channels and image states a first chunk takes
    from pfp import memory
    from pfp.train.memory import trace_training_preset
    gib = 1 << 30
    trace = trace_training_preset(memory.preset("wan21-i2v-14b-480p"), batch_size=1, clip_chunks=2, lora_rank=16)
    assert 30.3 < trace.frozen / gib < 30.7 and trace.target_tokens == 6240
    clip_bytes = 632_076_800 * 2   # CLIP ViT-H/14's vision tower in bf16
    assert clip_bytes < trace.vae < clip_bytes + gib // 2   # with Wan 2.1's VAE beside it
    assert trace.transient["step"] > trace.transient["text"] > 0
