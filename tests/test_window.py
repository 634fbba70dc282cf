"""The sliding window of PFP 3.4 (pfp.window): the newest history latent frames, uncompressed,
beside the compressed context. Streamed (chunk by chunk, the window rebuilt over a growing cache)
it must equal one call over the whole history, in both context modes."""
import dataclasses

import pytest
import torch

import pfp
from pfp.model import build_model
from pfp.window import window_context, with_window

from _tiny_pfp import tiny_config


def _model(mode: str, window: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(tiny_config(mode), sliding_window=window)).eval()
    with torch.no_grad():   # no zero-initialised branch: every part of the context must matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _history(model, frames: int, batch: int = 1):
    g = torch.Generator().manual_seed(1)
    c = model.backbone.latent_channels
    hr = torch.randn(batch, c, frames, 8, 8, generator=g)
    lr = torch.randn(*model.compressor.expected_lr_shape(hr.shape), generator=g)
    return hr, lr


def _target(model, batch: int = 1):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, model.backbone.latent_channels, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, model.text_encoder.dim, generator=g)
    return x, torch.linspace(0.3, 0.7, batch), text


def test_window_context_is_the_newest_frames_patchified_after_the_history():
    model = _model("cached")
    bb = model.backbone
    hr, _ = _history(model, 7, batch=2)
    win = window_context(bb, hr, 3)
    with torch.no_grad():
        want = bb.patch_embedding(hr[:, :, 4:]).flatten(2).transpose(1, 2)
    torch.testing.assert_close(win.tokens, want, rtol=0, atol=0)
    assert win.num_tokens == 3 * 4 * 4 and win.mask is None
    assert torch.equal(win.positions[:, 0], torch.arange(4.0, 7.0).repeat_interleave(16))
    assert torch.equal(win.positions[:16, 1:], torch.cartesian_prod(torch.arange(4.0), torch.arange(4.0)))
    assert torch.equal(win.order, torch.arange(7.0, 10.0).repeat_interleave(16))   # after the whole history
    # only the newest frames given: history_frames places them
    part = window_context(bb, hr[:, :, 5:], 3, history_frames=7)
    assert part.num_tokens == 2 * 16 and torch.equal(part.positions[:, 0], torch.tensor([5.0, 6.0]).repeat_interleave(16))
    assert window_context(bb, hr, 0) is None and window_context(bb, hr[:, :, :0], 3) is None
    assert window_context(bb, hr, 50).num_tokens == 7 * 16
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="frames must be an int >= 0"):
            window_context(bb, hr, bad)
    with pytest.raises(ValueError, match="history_frames=5 is less than the 7 frames given"):
        window_context(bb, hr, 3, history_frames=5)
    with pytest.raises(ValueError, match="sliding_window"):
        dataclasses.replace(tiny_config(), sliding_window=-2).check()


@pytest.mark.parametrize("mode", ["cached", "joint"])
@pytest.mark.parametrize("plan", [(12,), (4, 4, 4), (2, 6, 4)])
def test_window_streams_exactly(mode, plan):
    """Compressor stream + window per chunk (cached: the window's K/V over the growing cache) equals
    one compressor call over the whole history joined with its window, through the forward."""
    model = _model(mode)
    bb, comp = model.backbone, model.compressor
    hr, lr = _history(model, 12)
    x, t, text = _target(model)
    with torch.no_grad():
        full = with_window(comp(hr, lr), window_context(bb, hr, 3))
        want = bb(x, t, text, full, t_start=12)
        stream, cache, done = comp.stream(1), None, 0
        for n in plan:
            new = stream.append(hr[:, :, done:done + n], lr[:, :, done // 2:(done + n) // 2])
            done += n
            if mode == "cached":
                cache = bb.cache_context(new, cache)
        win = window_context(bb, hr[:, :, max(0, done - 3):done], 3, history_frames=done)
        if mode == "cached":
            ctx = bb.cache_context(win, cache)
            assert ctx.num_tokens == cache.num_tokens + win.num_tokens   # the cache itself is unchanged
            for a, b in zip(ctx.keys + ctx.values, bb.cache_context(full).keys + bb.cache_context(full).values):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            ctx = with_window(stream.context, win)
        got = bb(x, t, text, ctx, t_start=12)
        without = bb(x, t, text, cache if mode == "cached" else stream.context, t_start=12)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - without).abs().max() > 1e-3    # the window is seen


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_window_with_a_padded_context_ignores_the_padding(mode):
    """A batch whose second history is padded (masked tokens) gives that sample what it gets alone
    with only its real compressed tokens. The window beside them is the same in both runs: it has
    no per-sample length (training cuts every sample's history at the same chunk)."""
    model = _model(mode)
    bb, comp = model.backbone, model.compressor
    hr, lr = _history(model, 8, batch=2)
    x, t, text = _target(model, batch=2)
    with torch.no_grad():
        ctx = comp(hr, lr, hr_frames=[8, 4])          # sample 1: tokens of frames 4.. are padding
        win = window_context(bb, hr, 3)
        got = bb(x, t, text, with_window(ctx, win), t_start=8)
        real = ctx.mask[1]
        alone = with_window(pfp.Context(ctx.tokens[1:, real], ctx.positions[real], None, ctx.order[real]),
                            pfp.Context(win.tokens[1:], win.positions, None, win.order))
        want1 = bb(x[1:], t[1:], text[1:], alone, t_start=8)
        full0 = bb(x[:1], t[:1], text[:1], with_window(pfp.Context(ctx.tokens[:1], ctx.positions, None, ctx.order),
                                                         pfp.Context(win.tokens[:1], win.positions, None, win.order)),
                   t_start=8)
    torch.testing.assert_close(got[1:], want1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:1], full0, atol=1e-5, rtol=1e-5)


def test_a_cache_refuses_tokens_that_arrive_before_cached_ones():
    model = _model("cached")
    bb = model.backbone
    hr, lr = _history(model, 8)
    with torch.no_grad():
        ctx = model.compressor(hr, lr)
        late = pfp.Context(ctx.tokens[:, 8:], ctx.positions[8:], None, ctx.order[8:])
        early = pfp.Context(ctx.tokens[:, :8], ctx.positions[:8], None, ctx.order[:8])
        with pytest.raises(ValueError, match="come before cached ones"):
            bb.cache_context(early, bb.cache_context(late))
        # a cache's K/V as views of one that extends it: the same values, no copy of their own
        head = bb.cache_context(early)
        longer = bb.cache_context(late, head)
        viewed = head.viewed_in(longer)
        for mine, theirs, own in zip(viewed.keys + viewed.values, longer.keys + longer.values, head.keys + head.values):
            assert torch.equal(mine, own) and mine.data_ptr() == theirs.data_ptr()
        assert torch.equal(viewed.positions, head.positions) and viewed.num_tokens == head.num_tokens == 8
        with pytest.raises(ValueError, match="cannot hold"):
            longer.viewed_in(head)


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_generate_conditions_each_chunk_on_the_history_and_its_window(mode, monkeypatch):
    """Each generated chunk's context, as generate streams it, equals the one-call context of the
    latents before it (compressed + the newest 3 frames), and a window changes the video."""
    import pfp.sampler
    from pfp.generate import generate
    model = _model(mode)
    seen = []
    real_sample = pfp.sampler.sample

    def spy(backbone, shape, text, context=None, **kw):
        seen.append((kw["t_start"], context))
        return real_sample(backbone, shape, text, context, **kw)

    monkeypatch.setattr(pfp.sampler, "sample", spy)
    from pfp.text import Storyboard
    board = Storyboard.single("a red ball", 2.0)
    res = generate(model, board, 2.0, steps=2, seed=3, progress=False)      # 4 chunks of 4 latent frames
    assert len(seen) == 4 and seen[0][1] is None
    bb, comp = model.backbone, model.compressor
    x, t, text = _target(model)
    with torch.no_grad():
        for t_start, ctx in seen[1:]:
            k = int(t_start)
            hist, lr = res.latents[:, :, :k], res.lr_latents[:, :, :k // 2]
            full = with_window(comp(hist, lr), window_context(bb, hist, 3))
            if mode == "cached":
                assert ctx.num_tokens == full.num_tokens
                ref = bb.cache_context(full)
                for a, b in zip(ctx.keys + ctx.values, ref.keys + ref.values):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(ctx.tokens, full.tokens, atol=1e-5, rtol=1e-5)
                assert torch.equal(ctx.positions, full.positions) and torch.equal(ctx.order, full.order)
            torch.testing.assert_close(bb(x, t, text, ctx, t_start=k), bb(x, t, text, full, t_start=k),
                                       atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(pfp.sampler, "sample", real_sample)
    if mode == "cached":
        # one copy of the history's K/V: the cache generate keeps is the head of the windowed one
        k0 = res.context_cache.keys[0]
        assert k0.untyped_storage().nbytes() == k0.nbytes * (k0.shape[1] + 3 * 16) // k0.shape[1]
        # and read through [context ; target] buffers or stored in fp8, the same video as the plain run
        from pfp.offload import Placement
        buffered = generate(model, board, 2.0, steps=2, seed=3, progress=False,
                            plan=Placement(model, "cpu", {"kv": "buffer"}))
        assert torch.equal(buffered.video, res.video)
        fp8 = generate(model, board, 2.0, steps=2, seed=3, progress=False, plan=Placement(model, "cpu", {"kv": "fp8"}))
        assert (fp8.video - res.video).abs().max() < 0.05
    plain = dataclasses.replace(model.config, sliding_window=0)
    model.config = plain
    other = generate(model, board, 2.0, steps=2, seed=3, progress=False)
    assert torch.equal(other.video[:, :4], res.video[:, :4])           # the first chunk has no history
    assert (other.video[:, 4:] - res.video[:, 4:]).abs().max() > 1e-3


def test_finetune_trains_through_the_window(monkeypatch):
    """finetune_loss hands the backbone the compressed history joined with its newest frames
    (ordered after it, at their own times), and they change the loss."""
    from pfp.train.loop import TrainArgs, _batch, _dataset, step_generator
    from pfp.train.objectives import ObjectiveConfig, finetune_loss
    model = _model("cached", window=2).train()
    cfg = model.config
    batch = _batch(_dataset(TrainArgs(clip_seconds=2.0), cfg), step_generator(0, 0, 0, "data"), 2)
    contexts = []
    real_forward = model.backbone.forward

    def spy(x, t, text, context=None, **kw):
        contexts.append(context)
        return real_forward(x, t, text, context, **kw)

    monkeypatch.setattr(model.backbone, "forward", spy)
    for seed in range(20):   # until the drawn history is non-empty
        contexts.clear()
        loss = finetune_loss(model, model.backbone, batch, torch.Generator().manual_seed(seed), ObjectiveConfig(),
                             cfg.chunk_latent_frames, torch.device("cpu"))
        if contexts[-1] is not None:
            break
    ctx = contexts[-1]
    window = ctx.order >= ctx.order.max() - 1           # the two window frames come last
    assert int(window.sum()) == 2 * 16 and not window[:-32].any()
    t_hist = int(ctx.positions[window][:, 0].max()) + 1
    assert torch.equal(ctx.positions[window][:, 0], torch.tensor([t_hist - 2.0, t_hist - 1.0]).repeat_interleave(16))
    # the same draw without the window: another loss
    model.config = dataclasses.replace(cfg, sliding_window=0)
    plain = finetune_loss(model, model.backbone, batch, torch.Generator().manual_seed(seed), ObjectiveConfig(),
                          cfg.chunk_latent_frames, torch.device("cpu"))
    assert contexts[-1].num_tokens == ctx.num_tokens - 32
    assert abs(plain.item() - loss.item()) > 1e-6


def test_the_training_planner_counts_the_window_beside_the_compressed_history():
    """trace_training's finetune step reads the window as finetune_loss joins it: its tokens are in
    the context count and its activations in the step's peak."""
    from pfp.train.memory import trace_training
    base = tiny_config("cached")
    plain = trace_training(build_model(base), batch_size=2, clip_chunks=3)
    window = trace_training(build_model(dataclasses.replace(base, sliding_window=3)), batch_size=2, clip_chunks=3)
    assert window.context_tokens == plain.context_tokens + 3 * 16          # 3 frames of a 4x4 token grid
    assert window.transient["step"] > plain.transient["step"]


def test_the_planner_counts_the_window_mix_and_feature_kv():
    """trace_model's context grows by the window's tokens and the mixed compressors' tokens, and
    its K/V by the cross-attention's per-block K/V of the features."""
    from pfp.memory import trace_model
    base = dataclasses.replace(tiny_config("cached"))
    plain = trace_model(build_model(base), history_seconds=1.0)
    window = trace_model(build_model(dataclasses.replace(base, sliding_window=3)), history_seconds=1.0)
    assert window.context_tokens == plain.context_tokens + 3 * 16          # 3 frames of a 4x4 token grid
    mixed = trace_model(build_model(dataclasses.replace(base, mix_compressors=[{"rate": "2x2x4"}])), history_seconds=1.0)
    assert mixed.context_tokens == plain.context_tokens + 3 * 4            # 12 latent frames at 2x2x4
    assert mixed.compressor > plain.compressor
    xattn = trace_model(build_model(dataclasses.replace(base, cross_attention=True)), history_seconds=1.0)
    layers, inner = 1, 32
    assert xattn.kv == plain.kv + 2 * layers * plain.context_tokens * inner * 4   # fp32 K and V per feature
