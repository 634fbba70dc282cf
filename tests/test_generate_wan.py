"""Chunked generation with a causal temporal VAE: a tiny local AutoencoderKLWan (1 + 4k frames)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pfp.generate import InputError, chunk_plan, generate
from pfp.text import Storyboard
from pfp.weights import build_model, save_weights

from _tiny_pfp import assert_stream_matches_full, tiny_wan_backbone, wan_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = [{"start": 0, "end": 1, "prompt": "a red circle on a blue background"},
         {"start": 1, "end": 3, "prompt": "a white square on a green background"}]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops run faster on one thread


def _model(wan_vae_dir, mode):
    torch.manual_seed(0)
    model = build_model(wan_config(wan_vae_dir, context_mode=mode))
    with torch.no_grad():  # the zero-initialised heads would make every chunk the same
        model.compressor.proj.weight.normal_(0, 0.1)
        model.backbone.proj_out.weight.normal_(0, 0.05)
    return model


def test_config_frame_arithmetic(wan_vae_dir):
    cfg = wan_config(wan_vae_dir)
    assert (cfg.vae_spatial, cfg.vae_temporal, cfg.chunk_latent_frames) == (4, 4, 2)
    assert [cfg.clip_frames(k) for k in (1, 2, 3)] == [5, 13, 21]   # 1+4(n-1), then 4n per chunk
    spec = cfg.clip_spec(3)                                           # 6 latent frames -> 3 LR latent frames
    assert (spec.hr_frames, spec.lr_frames, spec.lr_fps) == (21, 9, 4.0)
    with pytest.raises(ValueError, match=r"clip has 12 frames.*use 9 or 13"):
        cfg.video_spec(12)
    bad = wan_config(wan_vae_dir)
    bad.chunk_frames = 4
    with pytest.raises(ValueError, match=r"chunk_frames=4 is not a multiple of 8 .*and the VAE by 4.*use 8"):
        bad.check()


def test_seconds_validation_names_counts_for_a_causal_vae(wan_vae_dir):
    cfg = wan_config(wan_vae_dir)
    assert chunk_plan(cfg, 2.0) == 2
    with pytest.raises(InputError, match=r"1 \+ 4\*k frames.*first chunk 5 frames; use --seconds 1 or 2 \(5 or 13 frames\)"):
        chunk_plan(cfg, 1.5)


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_generate_with_wan_vae_streams_exactly(wan_vae_dir, mode):
    from pfp.data import to_low_res
    model = _model(wan_vae_dir, mode)
    res = generate(model, Storyboard.from_list(STORY), 3.0, steps=2, cfg=2.0, progress=False)
    vae = model.vae
    # 3 chunks of 2 latent frames: 5 + 8 + 8 frames
    assert res.latents.shape == (1, 4, 6, 8, 8)
    assert res.video.shape == (3, 21, 32, 32)
    assert res.prompts == [STORY[0]["prompt"], STORY[1]["prompt"], STORY[1]["prompt"]]
    with torch.no_grad():
        # chunk-by-chunk decoding equals one decode of every latent
        torch.testing.assert_close(res.video[None], vae.decode(res.latents), atol=1e-5, rtol=1e-5)
        # the LR branch got, chunk by chunk, what training feeds it: to_low_res of the whole video, encoded
        lr_full = vae.encode(to_low_res(res.video[None], model.config.clip_spec(3)))
    assert lr_full.shape == (1, 4, 3, 4, 4)
    assert_stream_matches_full(model, res, mode, lr_full)


def _frames(path):
    import av
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_cli_writes_decodable_mp4_with_wan_vae(wan_vae_dir, tmp_path):
    model = _model(wan_vae_dir, "cached")
    save_weights(model, str(tmp_path / "w.safetensors"))
    # the weights file records the VAE's path, not its tensors
    from safetensors import safe_open
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert not any(k.startswith("_vae.") for k in f.keys())
    (tmp_path / "s.json").write_text(json.dumps(STORY))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pfp.generate", "--checkpoint", "w.safetensors", *args,
                               "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    r = run("--storyboard", "s.json", "--seconds", "2", "--steps", "2", "--out", "v.mp4", "--contact-sheet", "v.png")
    assert r.returncode == 0, r.stderr
    frames = _frames(str(tmp_path / "v.mp4"))
    assert len(frames) == 13 and frames[0].shape == (128, 128, 3)
    assert "13 frames" in r.stdout
    r = run("--seconds", "1.5", "--out", "bad.mp4")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "use --seconds 1 or 2 (5 or 13 frames)" in lines[0]
    assert not (tmp_path / "bad.mp4").exists()


@pytest.mark.parametrize("frames", [[0, 2], [1]])
def test_retrieval_metrics_decode_retrieved_frames_in_place_with_a_causal_vae(wan_vae_dir, frames):
    """A backbone that returns the exact velocity towards the clip's own latents retrieves them
    perfectly; the metric must then report the VAE's decode of those frames (PSNR far above any real
    error). Decoding a later latent frame alone, as the first frame of a clip, would not match."""
    from pfp.eval import retrieval_metrics
    model = _model(wan_vae_dir, "joint")
    cfg = model.config
    frames_px = cfg.clip_frames(2)                                      # 13 frames = 4 latent frames
    torch.manual_seed(1)
    hr = torch.rand(1, 3, frames_px, 32, 32) * 2 - 1
    spec = cfg.clip_spec(2)
    lr = torch.rand(1, 3, spec.lr_frames, *spec.lr_size) * 2 - 1
    target = model.vae.encode(hr)[:, :, frames]

    def exact_velocity(x, t, *args, **kwargs):
        return (x - target) / t.view(-1, 1, 1, 1, 1)     # x0-prediction of the true frames
    model.backbone.forward = exact_velocity
    m = retrieval_metrics(model, hr, lr, frames, steps=3)
    tf = cfg.vae_temporal
    expect = sum(1 if j == 0 else tf for j in frames)
    assert m["frames"].shape == (3, expect, 32, 32)
    assert m["psnr"] > 60, m["psnr"]
    lone = model.vae.decode(target[:, :, -1:])[0].clamp(-1, 1)        # the last frame decoded on its own
    if frames[-1] > 0:
        assert lone.shape[1] == 1 and (lone[:, 0] - m["frames"][:, -tf]).abs().max() > 1e-3


def test_sampler_matches_diffusers_flow_match_euler_given_the_same_sigmas():
    # parity of the sampler (eta = 0) with diffusers' FlowMatchEulerDiscreteScheduler at the same
    # shift and the same linear sigmas, with CFG applied the same way, on a tiny Wan backbone
    bb = tiny_wan_backbone()
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pfp.sampler import sample, timestep_schedule
    shape, steps, shift, cfg = (1, 4, 2, 4, 4), 6, 3.0, 2.5
    text, uncond = torch.randn(1, 5, 16), torch.zeros(1, 5, 16)
    ours = sample(bb, shape, text, None, uncond_text=uncond, steps=steps, shift=shift, cfg=cfg, seed=7)

    # diffusers shifts the plain linear sigmas itself; its schedule must be ours
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
    torch.testing.assert_close(scheduler.sigmas.float(), timestep_schedule(steps, shift), rtol=1e-6, atol=1e-7)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            t = (timestep / scheduler.config.num_train_timesteps).reshape(1)
            v_cond, v_uncond = bb(x, t, text).float(), bb(x, t, uncond).float()
            x = scheduler.step(v_uncond + cfg * (v_cond - v_uncond), timestep, x, return_dict=False)[0]
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
