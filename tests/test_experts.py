"""Two experts switched by timestep (Wan 2.2 A14B): pfp.backbones.experts.ExpertPair on tiny
diffusers Wan transformers."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from pfp.backbones.experts import ExpertKV, ExpertPair
from pfp.compressor import Context
from pfp.sampler import sample, timestep_schedule

from _tiny_pfp import TINY_WAN, tiny_wan_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(boundary=0.6, mode="cached"):
    high = tiny_wan_backbone(mode)
    torch.manual_seed(1)
    low = copy.deepcopy(high)
    with torch.no_grad():   # a different expert: every weight moved
        for p in low.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ExpertPair(high, low, boundary).eval()


def _context(n_frames=2, dim=24):
    t = torch.arange(n_frames, dtype=torch.float32).repeat_interleave(4)
    pos = torch.stack([t, torch.tensor([0.5, 0.5, 2.5, 2.5] * n_frames), torch.tensor([0.5, 2.5] * 2 * n_frames)], 1)
    return Context(torch.randn(1, 4 * n_frames, dim), pos)


def _inputs():
    torch.manual_seed(3)
    return torch.randn(2, 4, 2, 4, 4), torch.randn(2, 5, 16)


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_each_step_runs_on_the_expert_of_its_timestep(mode):
    # WanPipeline's rule: transformer (high noise) for t*1000 >= boundary_ratio*1000, else transformer_2
    pair = _pair(0.6, mode)
    ctx = _context()
    calls = []
    pair.high.blocks[0].register_forward_pre_hook(lambda m, a: calls.append("high"))
    pair.low.blocks[0].register_forward_pre_hook(lambda m, a: calls.append("low"))
    _, text = _inputs()
    kv = pair.cache_context(ctx) if mode == "cached" else ctx
    calls.clear()
    steps = 6
    got = sample(pair, (1, 4, 2, 4, 4), text[:1], kv, steps=steps, shift=3.0, seed=0, t_start=2)
    ts = timestep_schedule(steps, 3.0)[:-1].tolist()
    assert calls == ["high" if t >= 0.6 else "low" for t in ts]
    assert "high" in calls and "low" in calls
    # the same loop by hand, each step on its expert with that expert's own context K/V
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    full = timestep_schedule(steps, 3.0)
    with torch.no_grad():
        for i in range(steps):
            net = pair.high if full[i] >= 0.6 else pair.low
            c = (kv.high if net is pair.high else kv.low) if mode == "cached" else ctx
            x = x + (full[i + 1] - full[i]) * net(x, full[i].expand(1), text[:1], c, t_start=2).float()
    assert torch.equal(got, x)


def test_the_low_noise_expert_takes_its_own_guidance():
    # WanPipeline's guidance_scale_2: the low-noise expert's steps use their own CFG scale
    pair = _pair(0.6)
    kv = pair.cache_context(_context())
    _, text = _inputs()
    uncond = torch.zeros_like(text[:1])
    steps, cfg, cfg_2 = 5, 4.0, 1.5
    got = sample(pair, (1, 4, 2, 4, 4), text[:1], kv, uncond_text=uncond, steps=steps, cfg=cfg, cfg_2=cfg_2,
                 seed=0, t_start=2)
    full = timestep_schedule(steps, 3.0)
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(steps):
            high = float(full[i]) >= 0.6
            net, c, scale = (pair.high, kv.high, cfg) if high else (pair.low, kv.low, cfg_2)
            v = net(torch.cat([x, x]), full[i].expand(2), torch.cat([text[:1], uncond]), c, t_start=2).float()
            vc, vu = v.chunk(2)
            x = x + (full[i + 1] - full[i]) * (vu + scale * (vc - vu))
    torch.testing.assert_close(got, x, atol=1e-6, rtol=1e-5)
    plain = sample(pair, (1, 4, 2, 4, 4), text[:1], kv, uncond_text=uncond, steps=steps, cfg=cfg, seed=0, t_start=2)
    assert not torch.equal(plain, got)


def test_identical_experts_are_one_backbone():
    single = tiny_wan_backbone()
    pair = ExpertPair(single, copy.deepcopy(single), 0.5).eval()
    ctx = _context()
    _, text = _inputs()
    want = sample(single, (1, 4, 2, 4, 4), text[:1], single.cache_context(ctx), steps=4, seed=0, t_start=2)
    got = sample(pair, (1, 4, 2, 4, 4), text[:1], pair.cache_context(ctx), steps=4, seed=0, t_start=2)
    assert torch.equal(got, want)


def test_forward_routes_each_sample_of_a_mixed_batch():
    pair = _pair(0.5)
    x, text = _inputs()
    kv = pair.cache_context(_context())
    t = torch.tensor([0.8, 0.2])
    with torch.no_grad():
        got = pair(x, t, text, kv, t_start=2)
        want_high = pair.high(x[:1], t[:1], text[:1], kv.high, t_start=2)
        want_low = pair.low(x[1:], t[1:], text[1:], kv.low, t_start=2)
    assert torch.equal(got[:1], want_high) and torch.equal(got[1:], want_low)
    # per-frame timesteps: a sample goes by its noisiest frame
    with torch.no_grad():
        got = pair(x, torch.tensor([[0.1, 0.7], [0.3, 0.2]]), text, kv, t_start=2)
        want = pair.low(x[1:], torch.tensor([[0.3, 0.2]]), text[1:], kv.low, t_start=2)
    assert torch.equal(got[1:], want)
    # positions [Nt, 3] are shared by the batch, even when Nt happens to equal the batch size
    small = torch.randn(2, 4, 2, 2, 2)                       # 2 tokens for a batch of 2
    pos = torch.tensor([[5.0, 0.5, 0.5], [6.0, 0.5, 0.5]])
    with torch.no_grad():
        got = pair(small, t, text, kv, positions=pos)
        want = pair.low(small[1:], t[1:], text[1:], kv.low, positions=pos)
    assert torch.equal(got[1:], want)


def test_expert_kv_grows_incrementally_per_expert():
    pair = _pair()
    ctx = _context(3)
    first = Context(ctx.tokens[:, :4], ctx.positions[:4])
    rest = Context(ctx.tokens[:, 4:], ctx.positions[4:])
    with torch.no_grad():
        whole = pair.cache_context(ctx)
        grown = pair.cache_context(rest, pair.cache_context(first))
    assert isinstance(grown, ExpertKV) and grown.num_tokens == 12
    for name in ("high", "low"):
        for a, b in zip(whole.of(name).keys + whole.of(name).values, grown.of(name).keys + grown.of(name).values):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(whole.high.keys[0], whole.low.keys[0])   # each expert its own K/V


def test_a14b_config_builds_two_experts_with_lora_each_and_the_named_patch_embedding(tmp_path):
    pytest.importorskip("peft")
    from pfp.train.loop import apply_lora
    from pfp.weights import PFPConfig, build_model
    from _tiny_pfp import tiny_config
    cfg = dataclasses.replace(tiny_config(), text={"kind": "tiny", "dim": 16, "max_length": 12, "num_layers": 0},
                              vae={"kind": "patch", "spatial_factor": 1, "temporal_factor": 1},
                              dit={"kind": "wan", "config": {**TINY_WAN, "in_channels": 3, "out_channels": 3},
                                   "boundary": 0.875, "lr_patch_embed": "low"}, video_size=(8, 8))
    model = build_model(cfg)
    assert isinstance(model.backbone, ExpertPair) and model.backbone.boundary == 0.875
    assert model.compressor.patch_embed is model.backbone.low.patch_embedding
    apply_lora(model, rank=2)
    names = [n for n, _ in model.backbone.named_parameters() if "lora_A" in n]
    assert any(".high." in n for n in names) and any(".low." in n for n in names)
    # the config round-trips through JSON
    assert PFPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).dit["boundary"] == 0.875


@pytest.mark.parametrize("dit,expect", [
    ({"boundary": 1.5}, "dit.boundary 1.5 is not valid; use a number in \\(0, 1\\)"),
    ({"subfolder_2": "t2"}, "dit.subfolder_2 needs dit.boundary"),
    ({"boundary": 0.9, "lr_patch_embed": "mid"}, "dit.lr_patch_embed 'mid' is not valid; choose one of: high, low"),
])
def test_bad_expert_config_names_the_key(dit, expect):
    from pfp.config import check_component
    with pytest.raises(ValueError, match=expect):
        check_component("dit", {"kind": "wan", "config": TINY_WAN, **dit})


def test_a_folder_without_the_second_expert_is_refused(tmp_path):
    from pfp.config import check_component
    tiny_wan_backbone().transformer.save_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match="has no transformer_2/config.json"):
        check_component("dit", {"kind": "wan", "path": str(tmp_path), "boundary": 0.875})


def test_block_offload_prefetches_within_the_running_expert():
    from pfp.offload import BlockOffload
    pair = _pair()
    off = BlockOffload(pair.blocks, torch.device("cpu"), groups=pair.block_groups)
    n = len(pair.high.blocks)
    assert off.next[n - 1] == 0 and off.next[-1] == n       # each expert's last block wraps to its first
    off.remove()


def test_block_offload_with_two_experts_holds_two_blocks_and_gives_the_plain_video():
    # an expert's last block prefetches its own first one; when the other expert runs next, that
    # block leaves instead of staying in through the other's pass (three blocks in, one unplanned)
    from pfp.generate import generate
    from pfp.offload import Placement
    from pfp.text import Storyboard
    story = Storyboard.from_list([{"start": 0, "end": 2, "prompt": "a red circle"}])
    model = _a14b_model()
    want = generate(model, story, 2.0, steps=4, progress=False)
    placement = Placement(model, "cpu", {"offload": "block"}, park_to="nan")
    held = []
    for blk in model.backbone.blocks:   # registered after the offload hooks: runs once its block is in
        blk.register_forward_pre_hook(lambda m, a: held.append(sum(p.loaded for p in placement.blocks.parts)))
    got = generate(model, story, 2.0, steps=4, progress=False, plan=placement)
    assert held and max(held) == 2
    assert torch.equal(got.video, want.video)


def _a14b_model(boundary=0.6):
    from pfp.weights import build_model
    from _tiny_pfp import tiny_config
    cfg = dataclasses.replace(tiny_config(), dit={"kind": "wan", "config": {**TINY_WAN, "in_channels": 48,
                                                                            "out_channels": 48},
                                                  "boundary": boundary})
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_only_the_running_expert_is_on_the_device_and_the_video_is_the_same():
    from pfp.generate import generate
    from pfp.offload import Placement
    from pfp.text import Storyboard
    story = Storyboard.from_list([{"start": 0, "end": 2, "prompt": "a red circle"}])
    model = _a14b_model()
    want = generate(model, story, 2.0, steps=4, progress=False)
    for choices in ({"experts": "active"}, {"experts": "active", "swap": True, "kv": "native"}):
        placement = Placement(model, "cpu", choices, park_to="nan")   # the idle expert holds NaN
        seen = []
        handle = model.backbone.register_expert_hook(
            lambda name: seen.append(sum(p.loaded for p in placement._experts.values())))
        got = generate(model, story, 2.0, steps=4, progress=False, plan=placement)
        handle.remove()
        assert torch.equal(got.video, want.video), choices
        assert max(seen) == 1                                   # never both experts in
    # each chunk loads each expert once: the high one for its K/V and the next chunk's first steps,
    # the low one for the last steps (and the first chunk, with no context, loads the high one first)
    def expert_loads(choices):
        loads = []
        placement = Placement(model, "cpu", choices)
        for name, part in placement._experts.items():
            real = part.load
            part.load = lambda real=real, name=name: loads.append(name) or real()
        generate(model, story, 2.0, steps=4, progress=False, plan=placement)
        return loads
    chunks = len(want.timings)
    loads = expert_loads({"experts": "active"})
    assert loads.count("high") == chunks + 1 and loads.count("low") == chunks
    # with swap the decode parks both: the low one comes back for the K/V and again for its steps,
    # three expert loads a chunk, as the planner counts them
    loads = expert_loads({"experts": "active", "swap": True})
    assert loads.count("high") == chunks + 1 and loads.count("low") == 2 * chunks


@pytest.fixture(scope="module")
def a14b_trace():
    from pfp import memory
    return memory.trace_preset(memory.preset("wan22-t2v-a14b-480p"), history_seconds=20)


def test_the_planner_keeps_one_a14b_expert_on_budgets_that_need_it(a14b_trace):
    from pfp import memory
    gib = 1 << 30
    trace = a14b_trace
    assert trace.experts == 2 and abs(trace.expert / gib - 26.6) < 0.1       # 14.3 B parameters per expert, bf16
    assert abs(trace.transformer / gib - 2 * 26.6) < 0.2
    layers, inner = 80, 5120                                                  # both experts' K/V
    assert trace.kv == 2 * layers * trace.context_tokens * inner * 2
    whole = memory.choose(trace, 80 * gib)
    assert whole.fits and whole.choices["experts"] == "both" and whole.choices["weights"] == "native"
    one = memory.choose(trace, 32 * gib)
    assert one.fits and one.choices["experts"] == "active", one.choices
    # swapping adds the VAE, the transformer's shared parts, the compressor and a third expert load
    active = {**one.choices, "weights": "native", "offload": "none"}   # whole experts move
    moved = [memory.estimate(trace, {**active, "swap": swap}, None).bytes_moved_per_chunk for swap in (False, True)]
    assert moved[1] - moved[0] > trace.vae + trace.compressor + trace.expert
    assert one.bytes_moved_per_chunk >= 2 * trace.expert // 2                # each fp8 expert comes in once a chunk
    for p in one.phases:
        assert p.peak_bytes <= 32 * gib


@pytest.mark.parametrize("budget_gib", [24, 12])
def test_a14b_plans_fit_a_24_and_a_12_gib_card(a14b_trace, budget_gib):
    # the full-size A14B (two 26.6 GiB experts) traced without weights: every phase of a chunk,
    # the allowance included, stays within the budget; neither expert is whole on the card
    from pfp import memory
    gib = 1 << 30
    plan = memory.choose(a14b_trace, budget_gib * gib)
    assert plan.fits, plan.table()
    for p in plan.phases:
        assert memory.ALLOWANCE_BYTES <= p.peak_bytes <= budget_gib * gib, (p.name, p.peak_bytes)
    assert plan.choices["weights"] == "fp8", plan.choices
    assert plan.choices["experts"] == "active" or plan.choices["offload"] == "block", plan.choices


def test_a14b_pretrains_finetunes_with_lora_exports_and_generates(tmp_path, capsys):
    pytest.importorskip("peft")
    from pfp.generate import generate
    from pfp.text import Storyboard
    from pfp.train.__main__ import main
    from pfp.weights import load_weights
    from _tiny_pfp import tiny_config, write_config
    cfg = dataclasses.replace(tiny_config(), dit={"kind": "wan", "config": {**TINY_WAN, "in_channels": 48,
                                                                            "out_channels": 48, "text_dim": 16},
                                                  "boundary": 0.5})
    path = write_config(tmp_path / "cfg.json", cfg)
    common = ["--steps", "2", "--batch-size", "2", "--clip-seconds", "1", "--workers", "0", "--no-progress",
              "--threads", "1", "--save-every", "2"]
    pre, ft = tmp_path / "pre.safetensors", tmp_path / "ft.safetensors"
    assert main(["pretrain", "--config", path, "--out", str(tmp_path / "pre"), "--export", str(pre), *common]) == 0
    assert main(["finetune", "--config", path, "--init", str(pre), "--lora-rank", "2", "--out", str(tmp_path / "ft"),
                 "--export", str(ft), *common]) == 0
    model = load_weights(str(ft))
    assert isinstance(model.backbone, ExpertPair)
    # both experts trained (their LoRA merged in): each differs from the pretrained one
    before = load_weights(str(pre)).backbone
    for name in ("high", "low"):
        a = getattr(model.backbone, name).blocks[0].attn1.to_q.weight
        b = getattr(before, name).blocks[0].attn1.to_q.weight
        assert not torch.equal(a, b), name
    res = generate(model, Storyboard.single("a red circle", 1.0), 1.0, steps=2, progress=False)
    assert torch.isfinite(res.video).all()
    # a checkpoint of the one-expert Wan of the same blocks is refused by the two-expert config,
    # and the two-expert one by it, each in one line naming what does not fit
    single = write_config(tmp_path / "single.json", dataclasses.replace(cfg, dit={**cfg.dit, "boundary": None}))
    one = tmp_path / "one.safetensors"
    assert main(["pretrain", "--config", single, "--out", str(tmp_path / "one"), "--export", str(one), *common]) == 0
    for config, init in ((path, one), (single, pre)):
        capsys.readouterr()
        assert main(["finetune", "--config", config, "--init", str(init), "--out", str(tmp_path / "x"), *common]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "from another config" in errors[0] and "backbone." in errors[0], errors


def test_switch_policy_holds_one_experts_kv_and_gives_the_same_video():
    from pfp.generate import generate
    from pfp.offload import Placement
    from pfp.text import Storyboard
    story = Storyboard.from_list([{"start": 0, "end": 3, "prompt": "a red circle"}])
    model = _a14b_model()
    want = generate(model, story, 3.0, steps=4, progress=False)
    assert want.context_cache.high is not None and want.context_cache.low is not None
    placement = Placement(model, "cpu", {"expert_kv": "switch"})
    got = generate(model, story, 3.0, steps=4, progress=False, plan=placement)
    assert model.backbone.kv_policy == "both"                       # the placement put it back
    kv = got.context_cache
    assert (kv.high is None) != (kv.low is None) and kv.context.tokens.shape[1] == kv.num_tokens
    # rebuilding a whole expert's K/V in one pass equals extending it chunk by chunk, to rounding
    torch.testing.assert_close(got.video, want.video, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kv_policy must be 'both' or 'switch'"):
        model.backbone.set_kv_policy("one")


def test_a_cache_kept_across_a_kv_policy_change_holds_every_token():
    # a cache made under one policy and extended under the other: each expert's K/V, once routed
    # to, cover the whole history, as a cache made under "both" throughout does
    pair = _pair()
    torch.manual_seed(4)
    whole = _context(4)
    first = Context(whole.tokens[:, :8], whole.positions[:8])
    second = Context(whole.tokens[:, 8:], whole.positions[8:])
    want = pair.cache_context(second, pair.cache_context(first))
    for before, after in (("both", "switch"), ("switch", "both")):
        pair.set_kv_policy(before)
        kv = pair.cache_context(first)
        pair.set_kv_policy(after)
        kv = pair.cache_context(second, kv)
        for t, name in ((0.9, "high"), (0.1, "low")):
            got = pair.route(t, kv)[1]
            assert got.num_tokens == 16, (before, name)
            for a, b in zip(got.keys, want.of(name).keys):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    pair.set_kv_policy("both")


def test_the_planner_can_hold_one_experts_kv(a14b_trace):
    from pfp import memory
    gib = 1 << 30
    trace = a14b_trace
    both = memory.estimate(trace, {"weights": "fp8", "experts": "active"}, None)
    one = memory.estimate(trace, {"weights": "fp8", "experts": "active", "expert_kv": "switch"}, None)
    # half the K/V stays resident; two whole context passes a chunk cost time
    assert one.phases[1].peak_bytes < both.phases[1].peak_bytes - 2 * gib
    assert one.seconds_lost_per_chunk > both.seconds_lost_per_chunk


def test_two_bf16_experts_match_diffusers_within_one_bf16_step(tmp_path):
    # Wan 2.2 A14B loaded in bf16: each sample runs on the expert of its timestep (one batch
    # straddling the boundary), and each matches diffusers' own bf16 model of that expert within
    # one bf16 step at the output's magnitude
    pytest.importorskip("diffusers")
    import math

    from diffusers import WanTransformer3DModel

    from pfp.backbones import WanBackbone
    torch.manual_seed(0)
    for i, name in enumerate(("high", "low")):
        m = WanTransformer3DModel(**TINY_WAN).eval()
        with torch.no_grad():
            m.proj_out.weight.normal_(0, 0.05 * (i + 1))
        m.save_pretrained(tmp_path / name)
    load = lambda name: WanBackbone.from_pretrained(str(tmp_path / name), torch_dtype=torch.bfloat16).eval()
    pair = ExpertPair(load("high"), load("low"), 0.5).eval()
    x, text = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 5, TINY_WAN["text_dim"])
    t = torch.tensor([0.8, 0.3])                   # sample 0 on the high-noise expert, sample 1 on the low
    upstream = {name: WanTransformer3DModel.from_pretrained(str(tmp_path / name), torch_dtype=torch.bfloat16).eval()
                for name in ("high", "low")}
    with torch.no_grad():
        got = pair(x, t, text).float()
        for row, (name, other) in enumerate((("high", "low"), ("low", "high"))):
            run = lambda m: m(x[row:row + 1].bfloat16(), t[row:row + 1] * 1000, text[row:row + 1].bfloat16(),
                              return_dict=False)[0].float()
            want, wrong = run(upstream[name]), run(upstream[other])
            one_step = torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(want.abs().max().item()))
            err = (got[row:row + 1] - want).abs().max()
            assert err <= one_step, (name, err, one_step)
            assert (got[row:row + 1] - wrong).abs().max() > 4 * one_step   # the other expert would not pass


def test_two_experts_match_diffusers_wan_pipeline():
    # upstream parity of the switch and the second guidance scale: diffusers' own WanPipeline with
    # transformer, transformer_2 and boundary_ratio, run on the same noise, text states and sigmas
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from pfp.backbones import WanBackbone
    from _tiny_pfp import save_tiny_wan_vae
    import tempfile
    steps, shift, boundary, cfg, cfg_2 = 6, 3.0, 0.7, 3.0, 1.5

    class SameSigmas(FlowMatchEulerDiscreteScheduler):   # WanPipeline passes only a step count
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=torch.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist(),
                                  device=device)

    torch.manual_seed(0)
    upstream = [WanTransformer3DModel(**TINY_WAN).eval() for _ in range(2)]
    with torch.no_grad():
        for m in upstream:
            m.proj_out.weight.normal_(0, 0.05)
    ours = []
    for m in upstream:
        twin = WanTransformer3DModel.from_config(m.config).eval()
        twin.load_state_dict(m.state_dict())
        ours.append(WanBackbone(twin))
    pair = ExpertPair(ours[0], ours[1], boundary).eval()
    with tempfile.TemporaryDirectory() as d:
        vae = save_tiny_wan_vae(f"{d}/vae")
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=SameSigmas(shift=shift),
                       transformer=upstream[0], transformer_2=upstream[1], boundary_ratio=boundary)
    text, uncond = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    shape = (1, 4, 2, 4, 4)
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    want = pipe(prompt_embeds=text, negative_prompt_embeds=uncond, latents=noise.clone(), height=32, width=32,
                num_frames=5, num_inference_steps=steps, guidance_scale=cfg, guidance_scale_2=cfg_2,
                output_type="latent").frames
    got = sample(pair, shape, text, None, uncond_text=uncond, steps=steps, shift=shift, cfg=cfg, cfg_2=cfg_2, seed=3)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_a_window_shares_the_history_kv_except_under_switch():
    # "both": the history cache's K/V are views of the windowed cache's head (one copy); "switch":
    # the windowed cache drops its expert at the switch, so the history cache keeps its own copy,
    # and the planner counts it
    from pfp.generate import generate
    from pfp.offload import Placement
    from pfp.text import Storyboard
    story = Storyboard.from_list([{"start": 0, "end": 2, "prompt": "a red circle"}])
    model = _a14b_model()
    model.config = dataclasses.replace(model.config, sliding_window=2)
    want = generate(model, story, 2.0, steps=4, progress=False)
    for policy, shared in (("both", True), ("switch", False)):
        got = generate(model, story, 2.0, steps=4, progress=False, plan=Placement(model, "cpu", {"expert_kv": policy}))
        # switch rebuilds the other expert's K/V in one call, not chunk by chunk: float rounding apart
        torch.testing.assert_close(got.video, want.video, atol=1e-4, rtol=0, msg=policy)
        held = [kv for kv in (got.context_cache.high, got.context_cache.low) if kv is not None]
        k = held[0].keys[0]
        assert (k.untyped_storage().nbytes() > k.nbytes) == shared, policy
    from pfp import memory
    from pfp.memory import estimate
    trace = memory.trace_model(model, history_seconds=1.0)
    assert 0 < trace.kv_history < trace.kv
    peaks = {policy: {p.name: p.peak_bytes for p in estimate(trace, {"expert_kv": policy}, None).phases}["decode"]
             for policy in ("both", "switch")}
    no_copy = {p.name: p.peak_bytes for p in estimate(dataclasses.replace(trace, kv_history=0), {"expert_kv": "switch"},
                                                      None).phases}["decode"]
    assert peaks["switch"] > no_copy and peaks["switch"] < peaks["both"]
