"""Generation: the mp4, streaming inside generate, the sampler, and the CLI's bad-input cases."""
import dataclasses
import json
import os
import subprocess
import sys

import types

import pytest
import torch

from pfp.generate import generate
from pfp.sampler import sample, timestep_schedule
from pfp.text import Storyboard
from pfp.weights import DEFAULT_WEIGHTS, build_model, save_weights

from _tiny_pfp import assert_stream_matches_full, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = [{"start": 0, "end": 0.5, "prompt": "a red circle on a blue background"},
         {"start": 0.5, "end": 1.5, "prompt": "a white square on a green background"}]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    model = build_model(tiny_config())
    with torch.no_grad():  # the zero-initialised head would make every video identical
        model.backbone.proj_out.weight.normal_(0, 0.05)
        model.compressor.proj.weight.normal_(0, 0.05)
    save_weights(model, str(path))
    return str(path)


def _run(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pfp.generate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _frames(path):
    import av
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_schedule_runs_from_noise_to_data():
    ts = timestep_schedule(8, shift=3.0)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()


def test_sampler_seed_and_cfg(weights):
    from pfp.weights import load_weights
    model = load_weights(weights)
    text, mask = model.encode_text(["a red circle on a blue background"])
    un, umask = model.encode_text([""])
    shape = (1, model.backbone.latent_channels, 4, 8, 8)
    kw = dict(uncond_text=un, text_mask=mask, uncond_text_mask=umask, steps=3)
    a = sample(model.backbone, shape, text, None, seed=1, cfg=2.0, **kw)
    b = sample(model.backbone, shape, text, None, seed=1, cfg=2.0, **kw)
    c = sample(model.backbone, shape, text, None, seed=2, cfg=2.0, **kw)
    d = sample(model.backbone, shape, text, None, seed=1, cfg=1.0, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    with pytest.raises(ValueError, match="uncond_text"):
        sample(model.backbone, shape, text, None, cfg=2.0, steps=2)


def test_sampler_eta(weights):
    """eta = 0 is the Euler ODE step; eta = 1 re-noises the clean estimate completely: with one step
    left the result is the model's x0 estimate; eta is seeded like the initial noise."""
    from pfp.weights import load_weights
    model = load_weights(weights)
    text, mask = model.encode_text(["a red circle on a blue background"])
    shape = (1, model.backbone.latent_channels, 4, 8, 8)
    kw = dict(text_mask=mask, steps=3, shift=1.0)
    euler = sample(model.backbone, shape, text, None, seed=1, **kw)
    # eta=0 through the general formula: (1-t')x0 + t' eps with x0 = x - t v, eps = x + (1-t) v
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ts = timestep_schedule(3, 1.0)
    for i in range(3):
        t, tn = ts[i], ts[i + 1]
        v = model.backbone(x, t.expand(1), text, None, text_mask=mask).float()
        x = (1 - tn) * (x - t * v) + tn * (x + (1 - t) * v)
    torch.testing.assert_close(euler, x, atol=1e-5, rtol=1e-5)
    a = sample(model.backbone, shape, text, None, seed=1, eta=1.0, **kw)
    b = sample(model.backbone, shape, text, None, seed=1, eta=1.0, **kw)
    c = sample(model.backbone, shape, text, None, seed=1, eta=0.5, **kw)
    assert torch.equal(a, b) and not torch.allclose(a, euler) and not torch.allclose(c, a)
    # eta=1 with steps=1 is the x0 estimate at t=1 from the initial noise
    one = sample(model.backbone, shape, text, None, seed=1, eta=1.0, steps=1, shift=1.0, text_mask=mask)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    v = model.backbone(x, torch.ones(1), text, None, text_mask=mask).float()
    torch.testing.assert_close(one, x - v, atol=1e-5, rtol=1e-5)
    for bad in (-0.1, 1.5, "1"):
        with pytest.raises(ValueError, match="eta must be in"):
            sample(model.backbone, shape, text, None, eta=bad, steps=1)


def test_sampler_guidance_interval(weights):
    """cfg_min_t: steps at t <= cfg_min_t run the conditional branch alone (batch B, not 2B)."""
    from pfp.weights import load_weights
    model = load_weights(weights)
    text, mask = model.encode_text(["a red circle on a blue background"])
    un, umask = model.encode_text([""])
    shape = (1, model.backbone.latent_channels, 4, 8, 8)
    kw = dict(uncond_text=un, text_mask=mask, uncond_text_mask=umask, steps=4, shift=1.0, eta=0.5, seed=3)
    batches = []
    hook = model.backbone.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    try:
        # the schedule is 1, 0.75, 0.5, 0.25 -> guided, guided, unguided, unguided
        split = sample(model.backbone, shape, text, None, cfg=3.0, cfg_min_t=0.6, **kw)
    finally:
        hook.remove()
    assert batches == [2, 2, 1, 1]
    every = sample(model.backbone, shape, text, None, cfg=3.0, **kw)
    assert torch.equal(every, sample(model.backbone, shape, text, None, cfg=3.0, cfg_min_t=0.0, **kw))
    never = sample(model.backbone, shape, text, None, cfg=1.0, **kw)
    torch.testing.assert_close(sample(model.backbone, shape, text, None, cfg=3.0, cfg_min_t=1.0, **kw), never,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(split, every, atol=1e-3) and not torch.allclose(split, never, atol=1e-3)
    for bad in (-0.1, 1.5, "0.5"):
        with pytest.raises(ValueError, match="cfg_min_t must be in"):
            sample(model.backbone, shape, text, None, cfg=3.0, cfg_min_t=bad, **kw)


def test_generate_takes_the_sampler_settings_from_the_config(weights):
    from pfp.weights import load_weights
    model = load_weights(weights)
    model.config = dataclasses.replace(model.config, sample_cfg=3.0, sample_cfg_min_t=0.7, sample_eta=0.5)
    story = Storyboard.single("a red circle on a blue background", 1.0)
    run = lambda **kw: generate(model, story, 1.0, steps=3, seed=2, progress=False, **kw).latents  # noqa: E731
    default = run()  # 3 steps at the config's shift 3: t = 1, 0.86, 0.6 (the last one unguided)
    assert torch.equal(default, run(cfg=3.0, cfg_min_t=0.7, eta=0.5))
    assert not torch.equal(default, run(cfg_min_t=0.0)) and not torch.equal(default, run(cfg=2.0))


@pytest.mark.parametrize("field,value,expect", [("sample_cfg", -1.0, "config sample_cfg -1.0 is not valid"),
                                                ("sample_cfg", float("nan"), "config sample_cfg nan is not valid"),
                                                ("sample_cfg_min_t", 1.5, "config sample_cfg_min_t 1.5 is not valid")])
def test_sampler_config_errors(field, value, expect):
    with pytest.raises(ValueError, match=expect):
        dataclasses.replace(tiny_config(), **{field: value}).check()


def test_generate_writes_decodable_mp4_with_expected_frames(weights, tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(STORY))
    r = _run(["--checkpoint", weights, "--storyboard", "s.json", "--seconds", "1.5", "--steps", "2", "--out",
              "v.mp4", "--contact-sheet", "v.png", "--timings", "t.csv", "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr
    frames = _frames(str(tmp_path / "v.mp4"))
    assert len(frames) == 12  # 1.5 s at 8 fps
    assert frames[0].shape == (128, 128, 3)  # 32x32 upscaled to >= 128 px
    assert (tmp_path / "v.png").stat().st_size > 0
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].startswith("chunk,denoise_s,decode_s,compress_s") and len(rows) == 4


@pytest.mark.parametrize("mode,lr_phase", [("cached", "start"), ("joint", "start"), ("cached", "end")])
def test_streaming_inside_generate_matches_full_compression(mode, lr_phase):
    from pfp.data import to_low_res
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_config(mode), lr_phase=lr_phase))
    with torch.no_grad():
        model.compressor.proj.weight.normal_(0, 0.1)
        model.backbone.proj_out.weight.normal_(0, 0.05)
    res = generate(model, Storyboard.from_list(STORY), 1.5, steps=2, cfg=2.0, progress=False)
    assert res.video.shape == (3, 12, 32, 32)
    # sampling records no autograd graph (the weights require grad here)
    assert not res.context.tokens.requires_grad and not res.latents.requires_grad
    assert res.prompts == [STORY[0]["prompt"], STORY[1]["prompt"], STORY[1]["prompt"]]
    with torch.no_grad():
        # the low-res branch got, chunk by chunk, what training feeds it for the whole video
        lr_full = model.vae.encode(to_low_res(res.video[None], model.config.video_spec(12)))
    assert_stream_matches_full(model, res, mode, lr_full)


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_a_frame_the_grid_does_not_divide_streams_exactly_over_the_region_it_covers(mode):
    # 40x40 with the 4x patch VAE at 4x4x2: 1/4 of 40 px is not a whole number of latents, and the
    # grid's cells are 32 px, so it covers the top-left 32x32; the HR branch reads those latent rows
    # and columns and the LR branch sees that region at 1/4 size
    from pfp.data import to_low_res
    cfg = dataclasses.replace(tiny_config(mode), video_size=(40, 40), rate="4x4x2")
    cfg.check()
    spec = cfg.video_spec(12)
    assert cfg.lr_region() == (32, 32) and spec.lr_crop == (32, 32) and spec.lr_size == (8, 8)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.compressor.proj.weight.normal_(0, 0.1)
        model.backbone.proj_out.weight.normal_(0, 0.05)
    res = generate(model, Storyboard.from_list(STORY), 1.5, steps=2, cfg=2.0, progress=False)
    assert res.video.shape == (3, 12, 40, 40)
    with torch.no_grad():
        lr_full = model.vae.encode(to_low_res(res.video[None], spec))
        # the crop is the region: the same as the low-res video of the cropped frames
        cropped = to_low_res(res.video[None, :, :, :32, :32], dataclasses.replace(spec, hr_size=(32, 32), lr_crop=None))
    assert torch.equal(model.vae.encode(cropped), lr_full)
    assert_stream_matches_full(model, res, mode, lr_full)


def test_lr_phase_config_errors():
    with pytest.raises(ValueError, match="config lr_phase 'last' is not valid; choose one of: start, end"):
        dataclasses.replace(tiny_config(), lr_phase="last").check()
    causal = dataclasses.replace(tiny_config(), lr_phase="end", chunk_frames=8,
                                 vae={"kind": "patch", "spatial_factor": 4, "temporal_factor": 4})
    with pytest.raises(ValueError, match="lr_phase 'end' needs a VAE with temporal factor 1"):
        causal.check()
    with pytest.raises(ValueError, match="clips of a multiple of 2 frames"):
        dataclasses.replace(tiny_config(), lr_phase="end").video_spec(5)
    assert dataclasses.replace(tiny_config(), lr_phase="end").video_spec(6).lr_frames == 3


@pytest.mark.skipif(not os.path.isfile(DEFAULT_WEIGHTS), reason="built-in weights not shipped in this checkout")
def test_no_arguments_runs_the_builtin_model(tmp_path):
    r = _run([], tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(_frames(str(tmp_path / "pfp_video.mp4"))) == 32  # the built-in storyboard: 4 s at 8 fps


def _bad_cases(tmp_path, weights):
    (tmp_path / "overlap.json").write_text(json.dumps(
        [{"start": 0, "end": 1, "prompt": "a"}, {"start": 0.5, "end": 2, "prompt": "b"}]))
    (tmp_path / "broken.json").write_text("[{\"start\": 0, ")
    (tmp_path / "noprompt.json").write_text(json.dumps([{"start": 0, "end": 1}]))
    # weights of another config (inner width 48) under this config's metadata
    from safetensors.torch import save_file
    other = build_model(tiny_config(inner_dim=48))
    save_file({k: v.contiguous() for k, v in other.trainable_state_dict().items()}, str(tmp_path / "other.safetensors"),
              metadata={"format": "pfp.PFPModel/1", "config": json.dumps(tiny_config().to_dict())})
    ck = ["--checkpoint", weights]
    return [
        (ck + ["--storyboard", "missing.json"], "no such file"),
        (ck + ["--storyboard", "overlap.json"], "entry 1"),
        (ck + ["--storyboard", "broken.json"], "not valid JSON"),
        (ck + ["--storyboard", "noprompt.json"], "entry 0: missing key(s) 'prompt'"),
        (ck + ["--seconds", "1.3"], "use --seconds 1 or 1.5"),
        (ck + ["--size", "36x36"], "use 32 or 40x32 or 40"),
        (["--checkpoint", "other.safetensors"], "backbone."),
        (ck + ["--context-mode", "joint"], "context_mode"),
        (ck + ["--steps", "0"], "--steps"),
        (ck + ["--cfg", "-1"], "--cfg"),
        (ck + ["--cfg-min-t", "1.5"], "--cfg-min-t must be in [0, 1]"),
        (ck + ["--eta", "1.5"], "--eta must be in [0, 1]"),
        (ck + ["--device", "tpu"], "--device"),
        (ck + ["--seed", "x"], "--seed"),
        (ck + ["--out", "v.avi"], ".mp4"),
        (ck + ["--vram", "12"], "--vram must be a positive size with a unit"),
        (ck + ["--vram=-3GiB"], "--vram must be a positive size with a unit"),
        (ck + ["--vram", "0GiB"], "--vram must be > 0"),
        (ck + ["--vram", "64MiB"], "--vram 64MiB is too small for this model: no plan fits; the smallest needs"),
    ]


def test_bad_input_exits_with_one_line_and_no_file(weights, tmp_path):
    for args, expect in _bad_cases(tmp_path, weights):
        r = _run(args + ([] if "--out" in args else ["--out", "v.mp4"]) + ["--quiet"], tmp_path)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode != 0, (args, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert expect in lines[0], (args, lines[0])
        assert "Traceback" not in r.stderr and not r.stdout.strip()
        leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".mp4") or ".tmp-" in f]
        assert not leftovers, (args, leftovers)


def test_plan_prints_the_plan_and_writes_nothing(weights, tmp_path):
    r = _run(["--checkpoint", weights, "--seconds", "1.5", "--vram", "12GiB", "--plan"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "budget 12GiB" in r.stdout and "choices: weights=native, offload=none" in r.stdout
    assert "| denoise |" in r.stdout and "| decode |" in r.stdout
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".mp4")]


def test_eval_metrics(weights):
    from pfp.data import SyntheticMultiShotVideos
    from pfp.eval import psnr, retrieval_metrics, return_consistency, ssim, storyboard_returns
    from pfp.weights import load_weights
    v = torch.rand(3, 4, 16, 16) * 2 - 1
    assert psnr(v, v) == float("inf") and abs(ssim(v, v) - 1) < 1e-6
    assert psnr(v, -v) < 10 and ssim(v, torch.zeros_like(v)) < 0.5
    model = load_weights(weights)
    item = SyntheticMultiShotVideos(1, model.config.video_spec(8))[0]
    m = retrieval_metrics(model, item["hr"][None], item["lr"][None], [1, 5], steps=2)
    assert m["frames"].shape == (3, 2, 32, 32) and m["psnr"] > 0
    with pytest.raises(ValueError, match="frames"):
        retrieval_metrics(model, item["hr"][None], item["lr"][None], [8], steps=1)
    sb = Storyboard.from_list([{"start": 0, "end": 1, "prompt": "a"}, {"start": 1, "end": 2, "prompt": "b"},
                               {"start": 2, "end": 3, "prompt": "a"}])
    assert storyboard_returns(sb, 2.0, 6) == [(1, 4)]
    # A generated video changes prompt only at chunk starts. With 1.5 s chunks of 3 frames at 2 fps
    # the chunks take "a", "b", "a" (prompts at 0, 1.5 and 3 s): frames 3-5 show "b", 6-8 "a". Given
    # frames (the first chunk here) keep their own times: frame 2 (1 s) is "b". So "a" returns at
    # frame 6, not at frame 4 where the storyboard has it (the generated frame 4 shows "b").
    from pfp.eval import generated_returns
    cfg = types.SimpleNamespace(fps=2.0, clip_frames=lambda n: 3 * n)
    assert [sb.prompt_at(k * 1.5) for k in range(3)] == ["a", "b", "a"]
    assert storyboard_returns(sb, 2.0, 9)[0] == (1, 4)
    assert generated_returns(sb, ["a", "b", "a"], cfg, 9, 3) == [(1, 6)]
    assert generated_returns(sb, ["a", "b", "a"], cfg, 9, 7) == []      # the return lands in the history
    wan = types.SimpleNamespace(fps=2.0, clip_frames=lambda n: 4 * n - 3)   # a causal VAE: 1, then 4 frames
    assert generated_returns(sb, ["a", "b", "a"], wan, 9, 1) == [(0, 5)]
    assert return_consistency(v, [(0, 1)]) == psnr(v[:, 0], v[:, 1])


def test_scene_fidelity_scores_the_real_scene_high_and_noise_or_wrong_colours_low():
    from dataclasses import replace

    from pfp.data import SyntheticMultiShotVideos
    from pfp.data.synthetic import Scene, Sprite
    from pfp.eval import scene_fidelity
    ds = SyntheticMultiShotVideos(6, tiny_config().video_spec(4), seed=5)
    for i in range(len(ds)):
        scene, video = ds.plan(i).scenes[0], ds[i]["hr"]
        real = scene_fidelity(video, scene)
        assert real["palette"] > 0.85 and real["sprites"] in (None, 1.0), (scene, real)
        assert real["shape"] is None or 0.6 < real["shape"] <= 1.0, (scene, real)
        assert scene_fidelity(torch.rand_like(video) * 2 - 1, scene)["palette"] < 0.4
    # a flat frame of the background colour: the whole palette, but none of the sprites
    scene = Scene("solid", "blue", "blue", 0.0, 0.5, (Sprite("circle", "red", 0.2, 0.5, 0.5, 0.0, 0.0),))
    blue = torch.tensor([0.15, 0.30, 0.90]).view(3, 1, 1, 1).expand(3, 2, 8, 8) * 2 - 1
    assert scene_fidelity(blue, scene) == {"palette": 1.0, "sprites": 0.0, "shape": None}
    # the same frame with a red quarter: the sprite is there
    with_red = blue.clone()
    with_red[:, :, :4, :4] = torch.tensor([0.90, 0.12, 0.12]).view(3, 1, 1, 1) * 2 - 1
    got = scene_fidelity(with_red, scene)
    assert (got["palette"], got["sprites"]) == (1.0, 1.0) and 0.0 < got["shape"] < 1.0, got
    # the wrong background colour
    assert scene_fidelity(blue, replace(scene, colour="yellow", colour2="yellow"))["palette"] == 0.0
    # a sprite in the background's colour cannot be told apart, so it is not counted
    assert scene_fidelity(blue, replace(scene, sprites=(replace(scene.sprites[0], colour="blue"),)))["sprites"] is None
    with pytest.raises(ValueError, match="video must be"):
        scene_fidelity(blue[0], scene)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "diamond", "ring", "cross"])
def test_scene_fidelity_shape_tells_a_sprite_from_a_blob_of_its_colour(shape):
    from pfp.data import SyntheticMultiShotVideos
    from pfp.data.synthetic import Scene, Sprite
    from pfp.eval import scene_fidelity
    # one sprite drawn by the dataset's own renderer, centred off the pixel grid
    scene = Scene("solid", "blue", "blue", 0.0, 0.5, (Sprite(shape, "red", 0.25, 0.47, 0.53, 0.0, 0.0),))
    video = torch.tensor([0.15, 0.30, 0.90]).view(3, 1, 1, 1).repeat(1, 2, 32, 32) * 2 - 1
    SyntheticMultiShotVideos._draw_sprites(video, scene, torch.zeros(2))
    drawn = scene_fidelity(video, scene)["shape"]
    assert drawn > 0.85, drawn
    # the same pixels averaged over 8x8 tokens (what a coarse model makes): a blob, scored lower
    blocks = torch.nn.functional.avg_pool2d(video, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    blob = scene_fidelity(blocks, scene)["shape"]
    assert blob is None or blob < drawn - 0.15, (drawn, blob)
    # a disc of the sprite's colour: right for a circle, wrong for a ring, triangle or cross (a square
    # or diamond of this size shares most of its pixels with the disc, so they are not asserted)
    yy, xx = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    disc = video.clone()
    disc[:, :, ((xx - 16) ** 2 + (yy - 16) ** 2) < 7.5 ** 2] = torch.tensor([0.90, 0.12, 0.12]).view(3, 1, 1) * 2 - 1
    disc_score = scene_fidelity(disc, scene)["shape"]
    if shape == "circle":
        assert disc_score > 0.85, disc_score
    elif shape in ("triangle", "cross"):
        assert disc_score < drawn - 0.2, (drawn, disc_score)
    elif shape == "ring":                   # the disc only fills the ring's small hole
        assert disc_score < drawn - 0.05, (drawn, disc_score)


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_memory_false_gives_the_backbone_no_compressed_context(mode):
    """``memory=False``: the run no longer depends on the compressor's weights (nothing of its
    tokens reaches the backbone), the first chunk (no history yet) equals the run with memory, and
    later chunks differ from it; the streams still ran."""
    torch.manual_seed(0)
    model = build_model(tiny_config(mode))
    with torch.no_grad():
        model.compressor.proj.weight.normal_(0, 0.1)
        model.backbone.proj_out.weight.normal_(0, 0.05)
    story = Storyboard.from_list(STORY)
    run = lambda memory: generate(model, story, 1.5, steps=2, cfg=2.0, seed=1, progress=False, memory=memory)
    with_memory, without = run(True), run(False)
    n = model.config.chunk_latent_frames
    torch.testing.assert_close(without.latents[:, :, :n], with_memory.latents[:, :, :n], rtol=0, atol=0)
    assert not torch.allclose(without.latents[:, :, n:], with_memory.latents[:, :, n:])
    assert without.context.tokens.shape[1] == with_memory.context.tokens.shape[1] > 0
    with torch.no_grad():
        model.compressor.proj.weight.mul_(-3)
    torch.testing.assert_close(run(False).latents, without.latents, rtol=0, atol=0)
    assert not torch.allclose(run(True).latents, with_memory.latents)


def test_history_chunks_are_given_not_sampled(weights):
    """``history=``: the given chunks come out as given (decoded), and later chunks are sampled
    after them, conditioned on them."""
    from pfp.generate import InputError
    from pfp.weights import load_weights
    model = load_weights(weights)
    story = Storyboard.from_list(STORY)
    free = generate(model, story, 1.5, steps=2, cfg=2.0, seed=3, progress=False)
    n = model.config.chunk_latent_frames
    given = generate(model, story, 1.5, steps=2, cfg=2.0, seed=3, progress=False,
                     history=free.latents[:, :, :2 * n] + 0.25)
    torch.testing.assert_close(given.latents[:, :, :2 * n], free.latents[:, :, :2 * n] + 0.25)
    torch.testing.assert_close(given.video[:, :8], model.vae.decode(free.latents[:, :, :2 * n] + 0.25)[0].clamp(-1, 1))
    assert not torch.allclose(given.latents[:, :, 2 * n:], free.latents[:, :, 2 * n:])  # conditioned on the history
    for bad in (free.latents, free.latents[:, :, :n - 1] if n > 1 else free.latents[:, :1, :n], free.latents[0]):
        with pytest.raises(InputError, match="history must be"):
            generate(model, story, 1.5, steps=2, progress=False, history=bad)


@pytest.mark.parametrize("mode", ["cached", "joint"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_generate_with_a_reduced_precision_backbone(mode, dtype, tol):
    # a bf16/fp16 backbone beside the fp32 compressor and VAE (what a memory plan stores): the
    # shared patch embedding runs in the backbone's dtype, latents stay fp32, and the video stays
    # close to the fp32 one
    torch.manual_seed(0)
    model = build_model(tiny_config(mode))
    with torch.no_grad():
        model.compressor.proj.weight.normal_(0, 0.1)
        model.backbone.proj_out.weight.normal_(0, 0.05)
    want = generate(model, Storyboard.from_list(STORY), 1.5, steps=2, progress=False)
    model.backbone.to(dtype)
    got = generate(model, Storyboard.from_list(STORY), 1.5, steps=2, progress=False)
    assert got.latents.dtype == torch.float32 and got.video.dtype == torch.float32
    assert (got.video - want.video).abs().max() <= tol


def test_whole_chunks_is_the_arithmetic_every_length_check_shares():
    # generate's --seconds, train's --clip-seconds and a preset's plan each refuse in their own
    # words what this finds not whole
    from pfp.config import whole_chunks
    assert whole_chunks(2.0, 0.5) == 4 and whole_chunks(1, 1 / 3) == 3 and whole_chunks(0.5, 0.5) == 1
    assert whole_chunks(0.5 + 1e-9, 0.5) == 1                     # float noise is not a fraction of a chunk
    for bad in (2.1, 0.0, -1.0, float("nan"), float("inf"), True, "2"):
        assert whole_chunks(bad, 0.5) is None, bad
    assert whole_chunks(0.5, 0.5, least=2) is None and whole_chunks(1.0, 0.5, least=2) == 2
