"""Several compressors in one model (PFP 3.4, config mix_compressors): each with its own low-res
input, their contexts merged by arrival. Streamed chunk by chunk it must equal one call over the
whole history, in both context modes, with and without a sliding window."""
import dataclasses

import pytest
import torch

from pfp.compressor import mix_contexts
from pfp.model import build_model
from pfp.text import Storyboard
from pfp.window import window_context, with_window

from _tiny_pfp import tiny_config, write_config

MIX = [{"rate": "2x2x4"}, {"rate": "4x4x2", "kind": "without_lr", "hidden": [8, 8]}]


def _model(mode: str, window: int = 0, cross_attention: bool = False):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_config(mode), mix_compressors=MIX, sliding_window=window,
                                            cross_attention=cross_attention)).eval()
    with torch.no_grad():   # no zero-initialised branch: every compressor must matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_mixed_config_builds_one_compressor_per_entry_and_saves_the_shared_patch_once(tmp_path):
    model = _model("cached")
    comps = model.compressors
    assert [c.rate.t for c in comps] == [2, 4, 2] and [c.kind for c in comps] == ["pfp", "pfp", "without_lr"]
    assert all(c.patch_embed is model.backbone.patch_embed for c in comps)
    keys = model.trainable_state_dict()
    assert any(k.startswith("mix.1.stages.") for k in keys) and not any(".patch_embed." in k for k in keys
                                                                        if k.startswith("mix."))
    from pfp.weights import load_weights, save_weights
    save_weights(model, str(tmp_path / "w.safetensors"))
    again = load_weights(str(tmp_path / "w.safetensors"))
    assert again.config.mix_compressors == MIX
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(again.trainable_state_dict()[k], v), k
    # the same file refuses a model without the mix (its compressors are named)
    with pytest.raises(ValueError, match=r"holds compressors for pfp 2x2x2 \+ pfp 2x2x4 \+ without_lr 4x4x2"):
        load_weights(str(tmp_path / "w.safetensors"), config=tiny_config())


@pytest.mark.parametrize("entry, message", [
    ({"kind": "pfp"}, "must be an object with 'rate'"),
    ({"rate": "2x2x4", "width": 3}, "must be an object with 'rate'"),
    ({"rate": "2x2x4", "kind": "tiny"}, "kind 'tiny' is not valid"),
    ({"rate": "2x2x4", "hidden": [0]}, "hidden must be a list of positive ints"),
    ({"rate": "2x2x8"}, r"mix_compressors\[0\] \(rate 2x2x8\): config chunk_frames=4 is not a multiple of 8"),
])
def test_bad_mix_entries_are_named(entry, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(tiny_config(), mix_compressors=[entry]).check()
    with pytest.raises(ValueError, match="must be a list"):
        dataclasses.replace(tiny_config(), mix_compressors={"rate": "2x2x4"}).check()


@pytest.mark.parametrize("mode", ["cached", "joint"])
@pytest.mark.parametrize("window", [0, 3])
def test_generate_streams_mixed_compressors_exactly(mode, window, monkeypatch):
    """Each chunk's context as generate streams it equals one call over the latents before it:
    every compressor over the whole history (with its own low-res latents, as training makes them),
    merged, plus the window."""
    import pfp.sampler
    from pfp.data import to_low_res
    from pfp.generate import generate
    model = _model(mode, window)
    seen = []
    real_sample = pfp.sampler.sample
    monkeypatch.setattr(pfp.sampler, "sample", lambda bb, shape, text, context=None, **kw:
                        seen.append((kw["t_start"], context)) or real_sample(bb, shape, text, context, **kw))
    res = generate(model, Storyboard.single("a red ball", 2.0), 2.0, steps=2, seed=3, progress=False)
    assert len(seen) == 4 and len(res.mix_lr_latents) == 2
    lrs = [res.lr_latents, *res.mix_lr_latents]
    with torch.no_grad():
        # what each low-res branch was fed equals training's encode of the whole video at its rate
        for lr, branch in zip(lrs, model.config.branch_configs()):
            want = model.vae.encode(to_low_res(res.video[None], branch.video_spec(res.video.shape[1])))
            torch.testing.assert_close(lr, want, atol=1e-5, rtol=1e-5)
        bb = model.backbone
        g = torch.Generator().manual_seed(2)
        x = torch.randn(1, bb.latent_channels, 4, 8, 8, generator=g)
        text = torch.randn(1, 5, model.text_encoder.dim, generator=g)
        for t_start, ctx in seen[1:]:
            k = int(t_start)
            hist = res.latents[:, :, :k]
            full = model.compress(hist, [lr[:, :, :-(-k // c.rate.t)] for lr, c in zip(lrs, model.compressors)])
            full = with_window(full, window_context(bb, hist, window))
            assert bool((full.order[1:] >= full.order[:-1]).all())
            if mode == "cached":
                ref = bb.cache_context(full)
                assert ctx.num_tokens == ref.num_tokens
                for a, b in zip(ctx.keys + ctx.values, ref.keys + ref.values):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(ctx.tokens, full.tokens, atol=1e-5, rtol=1e-5)
                assert torch.equal(ctx.positions, full.positions) and torch.equal(ctx.order, full.order)
            torch.testing.assert_close(bb(x, torch.tensor([0.5]), text, ctx, t_start=k),
                                       bb(x, torch.tensor([0.5]), text, full, t_start=k), atol=1e-5, rtol=1e-5)
        # every compressor's tokens are in the last context
        per = [c(res.latents, lr) for c, lr in zip(model.compressors, lrs)]
        assert res.context.num_tokens == sum(p.num_tokens for p in per) and all(p.num_tokens for p in per)


def _mixed_history(model, frames: int, batch: int = 1):
    g = torch.Generator().manual_seed(1)
    c = model.backbone.latent_channels
    hr = torch.randn(batch, c, frames, 8, 8, generator=g)
    lrs = [torch.randn(*comp.expected_lr_shape(hr.shape), generator=g) for comp in model.compressors]
    x = torch.randn(batch, c, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, model.text_encoder.dim, generator=g)
    return hr, lrs, x, torch.linspace(0.3, 0.7, batch), text


@pytest.mark.parametrize("mode", ["cached", "joint"])
@pytest.mark.parametrize("window, cross_attention", [(0, False), (3, False), (0, True), (3, True)])
def test_any_chunk_plan_streams_mixed_compressors_exactly(mode, window, cross_attention):
    """Three compressors of three temporal rates (4, 2, 2: a chunk may end inside one's interval
    and not another's), streamed over irregular chunk plans (single frames, odd and uneven chunks)
    with the window and the cross-attention features, equal one call over the whole history."""
    model = _model(mode, window, cross_attention)
    bb, comps = model.backbone, model.compressors
    hr, lrs, x, t, text = _mixed_history(model, 16)
    with torch.no_grad():
        full = with_window(model.compress(hr, lrs), window_context(bb, hr, window))
        want = bb(x, t, text, bb.cache_context(full) if mode == "cached" else full, t_start=16)
        blind = bb(x, t, text, None, t_start=16)
        assert (want - blind).abs().max() > 1e-3            # the context is read
        for plan in [(16,), (1,) * 16, (3, 5, 1, 7), (5, 11)]:
            streams = [comp.stream(1, keep_features=cross_attention) for comp in comps]
            done, cache = 0, None
            for n in plan:
                parts = []
                for stream, comp, lr in zip(streams, comps, lrs):
                    rt = comp.rate.t
                    parts.append(stream.append(hr[:, :, done:done + n], lr[:, :, -(-done // rt):-(-(done + n) // rt)]))
                done += n
                if mode == "cached":
                    cache = bb.cache_context(mix_contexts(parts), cache)
            win = window_context(bb, hr[:, :, max(0, done - window):done], window, history_frames=done)
            if mode == "cached":
                ctx = bb.cache_context(win, cache) if win is not None else cache
            else:
                ctx = with_window(mix_contexts([s.context for s in streams]), win)
            torch.testing.assert_close(bb(x, t, text, ctx, t_start=16), want, atol=1e-5, rtol=1e-5, msg=str(plan))


@pytest.mark.parametrize("mode", ["cached", "joint"])
@pytest.mark.parametrize("cross_attention", [False, True])
def test_a_padded_mixed_batch_gives_each_sample_what_it_gets_alone(mode, cross_attention):
    """The second history is padded from 4 to 8 frames (hr_frames): every compressor masks its
    tokens past that sample's history, and the features too, so the sample's output is its own."""
    model = _model(mode, cross_attention=cross_attention)
    bb, comps = model.backbone, model.compressors
    hr, lrs, x, t, text = _mixed_history(model, 8, batch=2)
    with torch.no_grad():
        ctx = model.compress(hr, lrs, hr_frames=[8, 4])
        assert ctx.mask is not None and not bool(ctx.mask[1].all()) and bool(ctx.mask[0].all())
        got = bb(x, t, text, bb.cache_context(ctx) if mode == "cached" else ctx, t_start=8)
        alone = model.compress(hr[1:, :, :4], [lr[1:, :, :-(-4 // comp.rate.t)] for lr, comp in zip(lrs, comps)])
        want = bb(x[1:], t[1:], text[1:], bb.cache_context(alone) if mode == "cached" else alone, t_start=8)
        whole = model.compress(hr[1:], [lr[1:] for lr in lrs])   # the padding, read: another output
        unmasked = bb(x[1:], t[1:], text[1:], bb.cache_context(whole) if mode == "cached" else whole, t_start=8)
    torch.testing.assert_close(got[1:], want, atol=1e-5, rtol=1e-5)
    assert (unmasked - want).abs().max() > 1e-3


def test_mixed_compressors_train_and_evaluate(tmp_path):
    from pfp.eval import retrieval_table
    from pfp.train import TrainArgs, train
    from _tiny_pfp import write_video_folder
    cfg = write_config(tmp_path / "mix.json", dataclasses.replace(tiny_config(), mix_compressors=MIX,
                                                                  sliding_window=2))
    common = dict(config=cfg, batch_size=2, clip_seconds=1.0, workers=0, progress=False, save_every=10,
                  log_every=1, lr=1e-3, warmup=0)
    pre = train(TrainArgs(out=str(tmp_path / "pre"), mode="pretrain", steps=2, export=str(tmp_path / "p.safetensors"),
                          **common))
    for comp in pre["model"].mix:   # each compressor trains
        grads = [p.grad for n, p in comp.named_parameters() if not n.startswith("patch_embed.")]
        assert grads and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    ft = train(TrainArgs(out=str(tmp_path / "ft"), mode="finetune", steps=2, init=str(tmp_path / "p.safetensors"),
                         self_history=1.0, history_noise=0.1, **common))
    assert torch.isfinite(torch.tensor(ft["loss"]))
    write_video_folder(tmp_path / "videos", good=1, corrupt=0, short=0)
    row, = retrieval_table([str(tmp_path / "p.safetensors")], str(tmp_path / "videos"), steps=2, frames=2)
    assert row["variant"] == "pfp+pfp+without_lr" and row["rate"] == "2x2x2+2x2x4+4x4x2"
    # 4 chunks of 4 latent frames on a 4x4 token grid: 8*4 + 4*4 + 8*1 tokens
    assert row["context_tokens"] == 8 * 4 + 4 * 4 + 8 * 1


def test_a_size_that_only_the_first_compressor_fits_is_refused_before_any_work(tmp_path):
    import subprocess
    import sys

    from pfp.generate import InputError, generate
    from pfp.weights import save_weights
    model = _model("cached")
    s = model.config.vae_spatial
    small = (4 * s, 4 * s)    # one cell of 2x2x2's and 2x2x4's grid, half of 4x4x2's
    story = Storyboard.single("a red circle", 2 * model.config.chunk_seconds)
    with pytest.raises(InputError, match=rf"size {small[0]}x{small[1]} does not fit .*at least {8 * s}x{8 * s} "
                                         r"\(one cell of rate 2x2x2 and 2x2x4 and 4x4x2's grid\)"):
        generate(model, story, 2 * model.config.chunk_seconds, size=small, steps=1, progress=False)
    with pytest.raises(InputError, match=r"size must be \(height, width\) in pixels"):
        generate(model, story, 2 * model.config.chunk_seconds, size=(8.0 * s, 8 * s), steps=1, progress=False)
    with pytest.raises(InputError, match=rf"multiples of {2 * s}"):
        generate(model, story, 2 * model.config.chunk_seconds, size=(8 * s + 2 * s + 1, 8 * s), steps=1,
                 progress=False)
    save_weights(model, str(tmp_path / "mix.safetensors"))
    r = subprocess.run([sys.executable, "-m", "pfp.generate", "--checkpoint", str(tmp_path / "mix.safetensors"),
                        "--size", f"{small[0]}x{small[1]}", "--seconds", "1", "--out", str(tmp_path / "v.mp4")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--size" in r.stderr and "4x4x2" in r.stderr, r.stderr
