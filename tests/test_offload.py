"""Memory plans carried out (pfp.offload.Placement): on a tiny Wan model (diffusers transformer, Wan
VAE) every plan makes the same video as the plain run, bit for bit for the moves, within a stated
error for fp8; parts that are away are never used (they hold NaN while away); the bytes moved are
what the planner estimates."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pfp.generate import RunFailure, generate
from pfp.offload import Placement, check_choices
from pfp.text import Storyboard
from pfp.weights import build_model

from _tiny_pfp import TINY_WAN, wan_config

pytestmark = pytest.mark.usefixtures("one_thread")

STORY = Storyboard.from_list([{"start": 0, "end": 1, "prompt": "a red circle on a blue background"},
                              {"start": 1, "end": 3, "prompt": "a white square on a green background"}])
SECONDS, STEPS = 3.0, 3

# fp8 rounds each weight or K/V value to 3 mantissa bits (relative error <= 2^-4); through the tiny
# model and the VAE that moves the video by at most this much (video in [-1, 1]), measured 0.027
# for the weights and 1.2e-4 for the K/V
FP8_VIDEO_TOLERANCE = {"weights": 0.08, "kv": 0.01}


def _model(wan_vae_dir, mode: str):
    pytest.importorskip("diffusers")
    cfg = wan_config(wan_vae_dir, context_mode=mode)
    cfg = dataclasses.replace(cfg, dit={"kind": "wan", "config": {**TINY_WAN, "num_layers": 3}})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # the zero-initialised heads would make every chunk the same
        model.compressor.proj.weight.normal_(0, 0.1)
        model.backbone.transformer.proj_out.weight.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module", params=["cached", "joint"])
def plain(request, wan_vae_dir):
    model = _model(wan_vae_dir, request.param)
    return request.param, generate(model, STORY, SECONDS, steps=STEPS, progress=False)


EXACT_PLANS = [{"offload": "block"}, {"swap": True}, {"text": "free"}, {"text": "cpu"},
               {"offload": "block", "swap": True, "text": "free"}]


@pytest.mark.parametrize("choices", EXACT_PLANS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_moves_give_the_plain_video_bit_for_bit(plain, wan_vae_dir, choices):
    mode, want = plain
    model = _model(wan_vae_dir, mode)
    got = generate(model, STORY, SECONDS, steps=STEPS, progress=False,
                   plan=Placement(model, "cpu", choices, park_to="nan"))
    assert got.plan == check_choices(choices)
    assert torch.equal(got.video, want.video)
    assert torch.equal(got.latents, want.latents)
    assert got.bytes_moved > 0


@pytest.mark.parametrize("what", ["weights", "kv"])
def test_fp8_stays_within_its_stated_error(plain, wan_vae_dir, what):
    mode, want = plain
    model = _model(wan_vae_dir, mode)
    got = generate(model, STORY, SECONDS, steps=STEPS, progress=False,
                   plan=Placement(model, "cpu", {what: "fp8"}, park_to="nan"))
    err = (got.video - want.video).abs().max().item()
    assert err <= FP8_VIDEO_TOLERANCE[what], err
    if what == "weights" or mode == "cached":   # joint mode keeps no K/V: nothing to round
        assert err > 0
    if what == "kv" and mode == "cached":
        assert got.context_cache.is_fp8 and got.context_cache.keys[0].dtype == torch.float8_e4m3fn
    if what == "weights":
        assert model.backbone.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn


def test_context_kv_buffers_give_the_plain_video(plain, wan_vae_dir, monkeypatch):
    # kv="buffer": each denoising step attends through the cache's [context ; target] buffers (the
    # stock SDPA kernel over them, where the plain run's auto takes the C++ kernel: equal to
    # rounding); joint mode keeps no cache and runs as before. The buffers are freed after each
    # chunk's steps, and the backbone's setting is restored.
    import pfp_kernels
    mode, want = plain
    model = _model(wan_vae_dir, mode)
    calls = []
    real = pfp_kernels.JointKVBuffer.attend
    monkeypatch.setattr(pfp_kernels.JointKVBuffer, "attend", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    got = generate(model, STORY, SECONDS, steps=STEPS, progress=False,
                   plan=Placement(model, "cpu", {"kv": "buffer"}, park_to="nan"))
    assert got.plan["kv"] == "buffer" and not model.backbone.context_kv_buffers
    torch.testing.assert_close(got.video, want.video, atol=1e-4, rtol=0)
    if mode == "cached":
        assert len(calls) > 0 and got.context_cache._joint is None
    else:
        assert calls == []
    # a backbone whose blocks cannot read through the buffers is refused before anything moves
    model.backbone.supports_context_kv_buffers = False
    with pytest.raises(ValueError, match="kv='buffer' needs a backbone .* WanBackbone does not: use kv='native' or 'fp8'"):
        Placement(model, "cpu", {"kv": "buffer"})


def test_a_part_used_while_away_poisons_the_video(wan_vae_dir):
    # the check above can fail: a placement that forgets to bring the VAE back for the decode
    class Forgetful(Placement):
        def decode(self):
            self._park_transformer()
            return super().transformer()

    model = _model(wan_vae_dir, "cached")
    with pytest.raises(RunFailure, match="NaN"):
        generate(model, STORY, SECONDS, steps=STEPS, progress=False,
                 plan=Forgetful(model, "cpu", {"swap": True}, park_to="nan"))


def test_text_free_encodes_with_the_encoder_alone_on_the_device(wan_vae_dir):
    # what the planner counts for text="free" without swapping: the encoder alone in the text
    # phase, then the VAE and the transformer for good
    model = _model(wan_vae_dir, "cached")
    placement = Placement(model, "cpu", {"text": "free"}, park_to="nan")
    parts = lambda: (placement._text.loaded, placement._vae.loaded, placement._backbone.loaded)  # noqa: E731
    assert parts() == (False, False, False)
    with placement.text():
        assert parts() == (True, False, False)
    assert parts() == (False, True, True)
    placement.close()


def test_bad_input_is_refused_before_anything_moves(wan_vae_dir):
    from pfp.generate import InputError
    model = _model(wan_vae_dir, "cached")
    hooks = lambda: sum(len(b._forward_pre_hooks) for b in model.backbone.blocks)  # noqa: E731
    for bad in (dict(image=torch.zeros(3, 5, 5)), dict(history=torch.zeros(1, 2, 3))):
        with pytest.raises(InputError):
            generate(model, STORY, SECONDS, steps=STEPS, progress=False, plan={"offload": "block"}, **bad)
        assert hooks() == 0


def test_block_offload_moves_what_the_planner_counts_and_holds_two_blocks(wan_vae_dir):
    from pfp import memory
    model = _model(wan_vae_dir, "cached")
    placement = Placement(model, "cpu", {"offload": "block"}, park_to="nan")
    held = []
    for blk in model.backbone.blocks:   # registered after the offload hooks: runs once its block is in
        blk.register_forward_pre_hook(lambda m, a: held.append(sum(p.loaded for p in placement.blocks.parts)))
    res = generate(model, STORY, SECONDS, steps=STEPS, progress=False, plan=placement)
    assert held and max(held) == 2            # the running block and the prefetched next one
    trace = memory.trace_model(model, 2.0)
    est = memory.estimate(trace, {"offload": "block"}, None, STEPS)
    # every pass streams the blocks once, and the last one's wrap-around prefetch of block 0 is
    # never used
    n_chunks = len(res.timings)
    assert placement.blocks.bytes_moved == n_chunks * est.bytes_moved_per_chunk + placement.blocks.parts[0].nbytes


def test_a_budget_picks_a_plan_and_a_budget_too_small_is_refused(wan_vae_dir):
    from pfp.generate import InputError
    model = _model(wan_vae_dir, "cached")
    got = generate(model, STORY, SECONDS, steps=STEPS, progress=False, memory_budget="4GiB")
    assert got.plan == check_choices({})            # the tiny model fits: everything stays resident
    with pytest.raises(InputError, match=r"memory_budget 10MiB is too small .* smallest needs"):
        generate(model, STORY, SECONDS, steps=STEPS, progress=False, memory_budget="10MiB")


def test_bad_choices_name_the_valid_ones():
    with pytest.raises(ValueError, match="plan choice offload='disk' is not valid; choose one of: none, block"):
        check_choices({"offload": "disk"})
    with pytest.raises(ValueError, match="plan choice 'vram' is not one of"):
        check_choices({"vram": 1})


@pytest.mark.parametrize("decode", ["tiled", "tiled4"])
def test_a_tiled_decode_gives_the_plain_video(plain, wan_vae_dir, decode, monkeypatch):
    # decode="tiled" ("tiled4") runs the Wan decoder's last up-blocks in 2x2 (4x4) spatial tiles,
    # each with a halo as wide as their receptive field and its own causal cache
    # (WanVAE.tiled_decode_stream): the video is the plain run's up to float rounding (the tiles'
    # convs run on other sizes), and so are the later chunks' latents, which the low-res branch
    # takes from the re-encoded decoded frames.
    from pfp.offload import DECODE_TILES
    from pfp.vae import WanVAE, _WanTiledDecodeStream
    mode, want = plain
    model = _model(wan_vae_dir, mode)
    assert isinstance(model.vae, WanVAE)
    tiles_run = []   # the tiles of every frame the tiled decoder ran: the choice is carried out
    real_frame = _WanTiledDecodeStream._decode_frame
    def counting(stream, x, first):
        tiles_run.append(len(stream._tiles or ()) or stream.tiles ** 2)
        return real_frame(stream, x, first)
    monkeypatch.setattr(_WanTiledDecodeStream, "_decode_frame", counting)
    got = generate(model, STORY, SECONDS, steps=STEPS, progress=False,
                   plan=Placement(model, "cpu", {"decode": decode}, park_to="nan"))
    assert len(tiles_run) == got.latents.shape[2] and set(tiles_run) == {DECODE_TILES[decode] ** 2}
    n = model.config.chunk_latent_frames
    assert torch.equal(got.latents[:, :, :n], want.latents[:, :, :n])
    torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.video, want.video, rtol=0, atol=1e-5)
