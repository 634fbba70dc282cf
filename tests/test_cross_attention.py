"""Cross-attention enhancement (PFP 3.4, config cross_attention): every block's target tokens also
attend to the compressor's penultimate features. Zero-initialised; streamed chunk by chunk it
equals one call over the whole history, in both context modes, with masks, mixes and a window."""
import dataclasses

import pytest
import torch

import pfp
from pfp.model import build_model
from pfp.text import Storyboard
from pfp.window import window_context, with_window

from _tiny_pfp import tiny_config, write_config


def _config(mode="cached", **kw):
    return dataclasses.replace(tiny_config(mode), cross_attention=True, **kw)


def _model(mode="cached", perturb_memory=True, **kw):
    """The tiny model with every weight moved off its init (zero heads and projections included),
    the new cross-attention's too unless ``perturb_memory`` is False."""
    torch.manual_seed(0)
    model = build_model(_config(mode, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if perturb_memory or ".memory_attn." not in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(model, batch=1, frames=8):
    g = torch.Generator().manual_seed(1)
    c = model.backbone.latent_channels
    hr = torch.randn(batch, c, frames, 8, 8, generator=g)
    lr = torch.randn(*model.compressor.expected_lr_shape(hr.shape), generator=g)
    x = torch.randn(batch, c, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, model.text_encoder.dim, generator=g)
    return hr, lr, x, torch.linspace(0.3, 0.7, batch), text


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_zero_initialised_then_the_features_matter(mode):
    model = _model(mode, perturb_memory=False)
    bb = model.backbone
    assert bb.has_memory_attention and all(blk.memory_attn.to_out.weight.abs().sum() == 0 for blk in bb.blocks)
    hr, lr, x, t, text = _inputs(model)
    with torch.no_grad():
        ctx = model.compressor(hr, lr)
        assert ctx.features.shape == (1, ctx.num_tokens, 8)     # the last stage's 8 channels per token
        plain = pfp.Context(ctx.tokens, ctx.positions, None, ctx.order)
        torch.testing.assert_close(bb(x, t, text, ctx, t_start=8), bb(x, t, text, plain, t_start=8), rtol=0, atol=0)
        for blk in bb.blocks:
            blk.memory_attn.to_out.weight.normal_(std=0.5)
        assert (bb(x, t, text, ctx, t_start=8) - bb(x, t, text, plain, t_start=8)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_padded_features_are_ignored(mode):
    model = _model(mode)
    bb, comp = model.backbone, model.compressor
    hr, lr, x, t, text = _inputs(model, batch=2)
    with torch.no_grad():
        ctx = comp(hr, lr, hr_frames=[8, 4])
        assert torch.equal(ctx.feature_mask, ctx.mask)
        got = bb(x, t, text, bb.cache_context(ctx) if mode == "cached" else ctx, t_start=8)
        real = ctx.mask[1]
        alone = pfp.Context(ctx.tokens[1:, real], ctx.positions[real], None, ctx.order[real], ctx.features[1:, real])
        want = bb(x[1:], t[1:], text[1:], bb.cache_context(alone) if mode == "cached" else alone, t_start=8)
    torch.testing.assert_close(got[1:], want, atol=1e-5, rtol=1e-5)


MIX = [{"rate": "2x2x4", "hidden": [8, 8]}]


@pytest.mark.parametrize("mode", ["cached", "joint"])
@pytest.mark.parametrize("extras", [{}, {"mix_compressors": MIX, "sliding_window": 3}])
def test_generate_streams_the_features_exactly(mode, extras, monkeypatch):
    import pfp.sampler
    from pfp.generate import generate
    model = _model(mode, **extras)
    seen = []
    real_sample = pfp.sampler.sample
    monkeypatch.setattr(pfp.sampler, "sample", lambda bb, shape, text, context=None, **kw:
                        seen.append((kw["t_start"], context)) or real_sample(bb, shape, text, context, **kw))
    res = generate(model, Storyboard.single("a red ball", 2.0), 2.0, steps=2, seed=3, progress=False)
    lrs = [res.lr_latents, *res.mix_lr_latents]
    bb = model.backbone
    _, _, x, t, text = _inputs(model)
    with torch.no_grad():
        for t_start, ctx in seen[1:]:
            k = int(t_start)
            hist = res.latents[:, :, :k]
            full = model.compress(hist, [lr[:, :, :-(-k // c.rate.t)] for lr, c in zip(lrs, model.compressors)])
            full = with_window(full, window_context(bb, hist, model.config.sliding_window))
            if mode == "cached":
                ref = bb.cache_context(full)
                assert ctx.memory_keys is not None and ctx.memory_keys[0].shape == ref.memory_keys[0].shape
                # the features arrive per chunk and compressor: the same set as one call, in another order
                for a, b in zip(ctx.memory_keys + ctx.memory_values, ref.memory_keys + ref.memory_values):
                    torch.testing.assert_close(a.sum(1), b.sum(1), atol=1e-4, rtol=1e-5)
            else:
                assert ctx.features.shape == full.features.shape
            torch.testing.assert_close(bb(x, t, text, ctx, t_start=k), bb(x, t, text, full, t_start=k),
                                       atol=1e-5, rtol=1e-5)
            plain = pfp.Context(full.tokens, full.positions, None, full.order)
            assert (bb(x, t, text, plain, t_start=k) - bb(x, t, text, full, t_start=k)).abs().max() > 1e-4


@pytest.mark.parametrize("changes, message", [
    ({"compressor_kind": "only_lr"}, "needs compressors with conv stages"),
    ({"mix_compressors": [{"rate": "2x2x4", "kind": "large_patchify"}]}, "needs compressors with conv stages"),
    ({"mix_compressors": [{"rate": "2x2x4", "hidden": [8, 16]}]}, r"one width .* got \[8, 16\]"),
    ({"cross_attention": 1}, "cross_attention 1 is not valid"),
])
def test_bad_cross_attention_configs_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(_config(), **changes).check()


def test_lora_finetune_trains_the_cross_attention_whole(tmp_path):
    """Finetuning with LoRA trains the new cross-attention modules whole (only LoRA adapters
    elsewhere); a model trained without them starts from its file with --init-new as a glob."""
    from pfp.train import TrainArgs, train
    from pfp.weights import read_weights
    common = dict(batch_size=2, clip_seconds=1.0, workers=0, progress=False, save_every=10, log_every=1, lr=1e-2,
                  warmup=0)
    plain = write_config(tmp_path / "plain.json", tiny_config())
    train(TrainArgs(out=str(tmp_path / "pre"), mode="pretrain", steps=1, config=plain,
                    export=str(tmp_path / "pre.safetensors"), **common))
    cfg = write_config(tmp_path / "xattn.json", _config())
    out = train(TrainArgs(out=str(tmp_path / "ft"), mode="finetune", steps=3, config=cfg, lora_rank=4,
                          init=str(tmp_path / "pre.safetensors"), init_new="backbone.blocks.*.memory_attn.*",
                          p_no_history=0.0, **common))
    backbone = out["model"].backbone
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert any(".memory_attn.to_out." in n for n in trainable) and any("lora_" in n for n in trainable)
    assert not any(n.endswith("attn1.to_q.base_layer.weight") for n in trainable)
    moved = [p for n, p in backbone.named_parameters() if ".memory_attn.to_out.weight" in n]
    assert moved and all(p.abs().sum() > 0 for p in moved)     # left zero: it trained
    pre, _ = read_weights(str(tmp_path / "pre.safetensors"))
    assert not any("memory_attn" in k for k in pre)
    with pytest.raises(ValueError, match="--init-new 'backbone.blocks.\\*.nothing' names no tensor"):
        train(TrainArgs(out=str(tmp_path / "x"), mode="finetune", steps=1, config=cfg, lora_rank=4,
                        init=str(tmp_path / "pre.safetensors"), init_new="backbone.blocks.*.nothing", **common))
