"""Backbones: 3D RoPE from positions, the joint and cached context modes, the Wan adapter."""
import math

import pytest
import torch

from pfp.backbones import ContextKV, TinyDiT, apply_rope, grid_positions, rope_cos_sin
from pfp.backbones.rope import rope_axis_dims

from _tiny_pfp import tiny_wan_backbone


class _Ctx:
    """A stand-in with Context's fields (tokens [B, N, C], positions [N, 3])."""

    def __init__(self, tokens, positions):
        self.tokens, self.positions = tokens, positions


def _context(n_frames, h, w, dim, batch=1, rt=2, t0=0):
    j = torch.arange(t0, t0 + n_frames, dtype=torch.float32) * rt - (rt - 1) / 2
    g = torch.stack(torch.meshgrid(j, torch.arange(h) * 2 + 0.5, torch.arange(w) * 2 + 0.5, indexing="ij"), -1)
    pos = g.reshape(-1, 3)
    return _Ctx(torch.randn(batch, pos.shape[0], dim), pos)


def _tiny(mode, **kw):
    torch.manual_seed(0)
    m = TinyDiT(latent_channels=8, inner_dim=48, depth=2, num_heads=4, text_dim=16, freq_dim=32,
                context_mode=mode, **kw)
    # the zero-initialised output/modulation would hide differences: give them values
    with torch.no_grad():
        for p in (m.proj_out.weight, m.time_proj.weight):
            p.normal_(0, 0.05)
    return m.eval()


def test_rope_axis_split_matches_wan():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert sum(rope_axis_dims(48)) == 48


def test_rope_fractional_positions_are_rotations():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 2, 12, dtype=torch.float64).float()
    half = torch.full((5, 3), 0.5)
    one = torch.full((5, 3), 1.0)
    # rotating by the angle of position 0.5 twice == rotating by position 1 (a rotation, not a table average)
    r_half = apply_rope(apply_rope(x, *rope_cos_sin(half, 12)), *rope_cos_sin(half, 12))
    r_one = apply_rope(x, *rope_cos_sin(one, 12))
    torch.testing.assert_close(r_half, r_one, atol=1e-5, rtol=1e-5)
    # norms are preserved per pair
    y = apply_rope(x, *rope_cos_sin(torch.rand(5, 3) * 7, 12))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # averaging the integer tables is not a rotation: its norm shrinks
    c0, s0 = rope_cos_sin(torch.zeros(5, 3), 12)
    c1, s1 = rope_cos_sin(torch.full((5, 3), 1.0), 12)
    avg = apply_rope(x, (c0 + c1) / 2, (s0 + s1) / 2)
    assert (avg.norm(dim=-1) < x.norm(dim=-1) - 1e-4).any()


def test_rope_matches_diffusers_wan_on_the_grid():
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    head_dim, (t, h, w) = 24, (3, 4, 5)
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=32)
    cos_ref, sin_ref = rope(torch.zeros(1, 4, t, 2 * h, 2 * w))
    cos, sin = rope_cos_sin(grid_positions(t, h, w), head_dim)
    torch.testing.assert_close(cos_ref[0, :, 0, 0::2].float(), cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin_ref[0, :, 0, 1::2].float(), sin, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["joint", "cached"])
def test_forward_shapes_and_batch1_context_broadcast(mode):
    m = _tiny(mode)
    x = torch.randn(2, 8, 2, 4, 6)
    ctx = _context(3, 1, 2, 48)
    text = torch.randn(1, 5, 16)
    with torch.no_grad():
        v = m(x, torch.tensor([0.2, 0.9]), text, ctx, t_start=6)
        v_exp = m(x, torch.tensor([0.2, 0.9]), text, _Ctx(ctx.tokens.expand(2, -1, -1).clone(), ctx.positions),
                  t_start=6)
        v0 = m(x[:1], torch.tensor([0.2]), text, ctx, t_start=6)
    assert v.shape == x.shape
    torch.testing.assert_close(v, v_exp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v[:1], v0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["joint", "cached"])
def test_bf16_weights_run_and_track_fp32(mode):
    # A model cast to bf16 (how a GPU user runs inference) takes bf16 inputs end to end.
    m = _tiny(mode)
    m16 = _tiny(mode).to(torch.bfloat16)
    x = torch.randn(2, 8, 2, 4, 6)
    ctx = _context(3, 1, 2, 48)
    text = torch.randn(2, 5, 16)
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        want = m(x, t, text, ctx, t_start=6)
        ctx16 = _Ctx(ctx.tokens.bfloat16(), ctx.positions)
        got = m16(x.bfloat16(), t, text.bfloat16(), m16.cache_context(ctx16) if mode == "cached" else ctx16,
                  t_start=6)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 3e-2, err


def test_context_changes_the_prediction_in_both_modes():
    x = torch.randn(1, 8, 2, 4, 6)
    text = torch.randn(1, 5, 16)
    for mode in ("joint", "cached"):
        m = _tiny(mode)
        with torch.no_grad():
            a = m(x, torch.tensor([0.5]), text, _context(2, 1, 2, 48), t_start=4)
            b = m(x, torch.tensor([0.5]), text, None, t_start=4)
        assert (a - b).abs().max() > 1e-4


def test_cached_kv_equals_on_the_fly_and_incremental_equals_full():
    m = _tiny("cached")
    ctx = _context(4, 1, 2, 48)
    x = torch.randn(2, 8, 2, 4, 6)
    text = torch.randn(2, 5, 16)
    with torch.no_grad():
        kv = m.cache_context(ctx)
        assert isinstance(kv, ContextKV) and kv.num_tokens == 8 and kv.batch_size == 1
        v_kv = m(x, torch.tensor([0.3, 0.6]), text, kv, t_start=8)
        v_ctx = m(x, torch.tensor([0.3, 0.6]), text, ctx, t_start=8)
        torch.testing.assert_close(v_kv, v_ctx, atol=1e-5, rtol=1e-5)
        # appending new context tokens computes only them, attending to the cached ones
        part1 = _Ctx(ctx.tokens[:, :2], ctx.positions[:2])
        part2 = _Ctx(ctx.tokens[:, 2:6], ctx.positions[2:6])
        part3 = _Ctx(ctx.tokens[:, 6:], ctx.positions[6:])
        inc = m.cache_context(part3, m.cache_context(part2, m.cache_context(part1)))
    for a, b in zip(kv.keys + kv.values, inc.keys + inc.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv.positions, inc.positions)


def test_fp8_context_kv_halves_the_cache_and_stays_close():
    # per-token, per-head scales: a one-shot fp8 cache is the full one rounded to 3 mantissa bits,
    # an incremental one (new tokens attending to rounded old ones) stays within the same bound,
    # and the velocity read through it stays close
    from pfp.backbones.wan_style import FP8_KV_DTYPE
    m = _tiny("cached").eval()
    x, t, text = torch.randn(2, 8, 2, 4, 4), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 16)
    ctx = _context(3, 2, 2, 48)
    first, rest = _Ctx(ctx.tokens[:, :8], ctx.positions[:8]), _Ctx(ctx.tokens[:, 8:], ctx.positions[8:])
    with torch.no_grad():
        full = m.cache_context(ctx)
        once = m.cache_context(ctx, kv_storage="fp8")
        grown = m.cache_context(rest, m.cache_context(first, kv_storage="fp8"))
        assert grown.is_fp8 and grown.keys[0].dtype == FP8_KV_DTYPE and grown.num_tokens == full.num_tokens
        assert once.nbytes() < 0.5 * full.nbytes()   # 1 byte per value + one fp32 scale per 12 values, vs 4
        for cache in (once, grown):
            for i in range(len(full.keys)):
                for got, want in zip(cache.layer(i, torch.float32), (full.keys[i], full.values[i])):
                    bound = 2.0 ** -4 * want.abs().amax(dim=-1, keepdim=True) * (1.05 if cache is once else 1.5)
                    assert bool(((got - want).abs() <= bound).all()), i
        want = m(x, t, text, full, t_start=6)
        got = m(x, t, text, grown, t_start=6)
    err = (got - want).abs().max()
    assert 0 < err <= 0.02 * want.abs().max(), err
    with pytest.raises(ValueError, match="kv_storage must be 'native' or 'fp8'"):
        m.cache_context(ctx, kv_storage="int8")


@pytest.mark.parametrize("kv_storage", ["native", "fp8"])
@pytest.mark.parametrize("make", [lambda: _tiny("cached"), lambda: _wan_bb("cached")], ids=["tiny", "wan"])
def test_denoising_through_context_kv_buffers_equals_the_plain_cache(make, kv_storage):
    # A denoising loop over one ContextKV: the buffers are made on the first step and reused by the
    # next ones (another batch or target size replaces them), and every step's velocity equals the
    # plain cache's. Under autograd, and with new context tokens, forward runs as before.
    m = make()
    ctx = _context(3, 1, 2, m.inner_dim)
    text = torch.randn(2, 5, 16)
    with torch.no_grad():
        kv = m.cache_context(ctx, kv_storage=kv_storage)
        for step, (x, t) in enumerate([(torch.randn(2, m.latent_channels, 2, 4, 4), torch.tensor([0.9, 0.8])),
                                       (torch.randn(2, m.latent_channels, 2, 4, 4), torch.tensor([0.5, 0.4])),
                                       (torch.randn(1, m.latent_channels, 1, 4, 4), torch.tensor([0.2]))]):
            m.use_context_kv_buffers(False)
            want = m(x, t, text[: x.shape[0]], kv, t_start=6)
            assert step > 0 or kv._joint is None   # off: none made
            m.use_context_kv_buffers(True)
            got = m(x, t, text[: x.shape[0]], kv, t_start=6)
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
            buffers = kv._joint
            nt = math.prod(m.token_grid(*x.shape[2:]))
            assert len(buffers) == len(m.blocks) and buffers[0].keys.shape[:2] == (x.shape[0], kv.num_tokens + nt)
            if step == 1:
                assert buffers is first   # same batch and target size: reused
            first = buffers
        buffers[0].values[:, : kv.num_tokens].fill_(1e3)   # the steps read the context from the buffers
        assert (m(x, t, text[: x.shape[0]], kv, t_start=6) - want).abs().max() > 1e-3
    m.use_context_kv_buffers(True)
    kv2 = m.cache_context(ctx)
    with torch.enable_grad():
        x = torch.randn(2, m.latent_channels, 2, 4, 4, requires_grad=True)
        m(x, torch.tensor([0.9, 0.8]), text, kv2, t_start=6).sum().backward()
    assert kv2._joint is None and x.grad is not None


def test_cached_context_is_causal_and_text_free():
    m = _tiny("cached")
    ctx = _context(3, 1, 2, 48)
    with torch.no_grad():
        kv = m.cache_context(ctx)
        # later context frames do not change earlier tokens' K/V
        changed = _Ctx(ctx.tokens.clone(), ctx.positions)
        changed.tokens[:, 4:] += torch.randn_like(changed.tokens[:, 4:])
        kv2 = m.cache_context(changed)
    for k1, k2 in zip(kv.keys, kv2.keys):
        torch.testing.assert_close(k1[:, :4], k2[:, :4])
        assert (k1[:, 4:] - k2[:, 4:]).abs().max() > 1e-4


def test_joint_mode_context_sees_targets():
    # in joint mode the context is recomputed with the targets: changing the first target frame changes
    # the second frame's prediction only through attention (both modes), but the context stream itself
    # depends on the targets only in joint mode; check via the output difference between the modes
    x = torch.randn(1, 8, 2, 4, 6)
    text = torch.randn(1, 5, 16)
    ctx = _context(2, 1, 2, 48)
    j, c = _tiny("joint"), _tiny("cached")
    c.load_state_dict(j.state_dict())
    with torch.no_grad():
        assert (j(x, torch.tensor([0.5]), text, ctx) - c(x, torch.tensor([0.5]), text, ctx)).abs().max() > 1e-5


def test_per_frame_timesteps_and_positions():
    m = _tiny("cached")
    x = torch.randn(2, 8, 3, 4, 6)
    text = torch.randn(2, 5, 16)
    with torch.no_grad():
        same = m(x, torch.tensor([0.4, 0.4]), text)
        per_frame = m(x, torch.full((2, 3), 0.4), text)
        per_token = m(x, torch.full((2, 3 * 2 * 3), 0.4), text)
        torch.testing.assert_close(same, per_frame)
        torch.testing.assert_close(same, per_token)
        pos = grid_positions(3, 2, 3, t_start=5.0)
        torch.testing.assert_close(m(x, torch.tensor([0.4, 0.4]), text, positions=pos),
                                   m(x, torch.tensor([0.4, 0.4]), text, t_start=5.0))
        per_sample = m(x, torch.tensor([0.4, 0.4]), text, positions=torch.stack([pos, grid_positions(3, 2, 3)]))
        torch.testing.assert_close(per_sample[0], m(x[:1], torch.tensor([0.4]), text[:1], t_start=5.0)[0],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="timesteps"):
        m(x, torch.zeros(2, 5), text)
    with pytest.raises(ValueError, match="multiple of the patch"):
        m(torch.randn(1, 8, 2, 5, 6), torch.tensor([0.1]), text[:1])


@pytest.mark.parametrize("mode", ["joint", "cached"])
def test_gradients_reach_context_and_patch_embedding(mode):
    m = _tiny(mode).train()
    m.set_gradient_checkpointing(True)
    ctx = _context(2, 1, 2, 48)
    ctx.tokens.requires_grad_(True)
    v = m(torch.randn(1, 8, 2, 4, 6), torch.tensor([0.5]), torch.randn(1, 5, 16), ctx, t_start=4)
    v.square().mean().backward()
    assert ctx.tokens.grad is not None and ctx.tokens.grad.abs().sum() > 0
    assert m.patch_embed.weight.grad.abs().sum() > 0


def test_bad_context_mode():
    with pytest.raises(ValueError, match="context_mode"):
        TinyDiT(context_mode="sliding")


def test_wan_adapter_matches_diffusers_and_runs_both_modes():
    pytest.importorskip("diffusers")
    from pfp.backbones import WanBackbone
    torch.manual_seed(0)
    bb = WanBackbone.from_config(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2,
                                 rope_max_seq_len=64).eval()
    x = torch.randn(2, 4, 3, 6, 8)
    t = torch.tensor([0.3, 0.8])
    text = torch.randn(2, 5, 16)
    # the backbone takes the transformer over (its blocks become WanStyleBlocks over the same
    # parameters, state-dict names unchanged): the reference is a fresh diffusers model with its weights
    from diffusers import WanTransformer3DModel
    diffusers_model = WanTransformer3DModel.from_config(bb.transformer.config).eval()
    diffusers_model.load_state_dict(bb.transformer.state_dict())
    with torch.no_grad():
        ref = diffusers_model(x, t * 1000, text, return_dict=False)[0]
        torch.testing.assert_close(bb(x, t, text), ref, atol=1e-5, rtol=1e-4)
        ctx = _context(2, 1, 2, 24)
        cached = bb(x, t, text, bb.cache_context(ctx), t_start=4)
        bb.context_mode = "joint"
        joint = bb(x, t, text, ctx, t_start=4)
    assert cached.shape == joint.shape == x.shape
    assert torch.isfinite(cached).all() and torch.isfinite(joint).all()
    assert bb.patch_embed is bb.transformer.patch_embedding


class _ContextBlindCrossAttention:
    """diffusers' own cross-attention processor with the first ``n`` query rows' output zeroed: the
    context tokens read no text (by design; see WanStyleBlock), the target tokens read it as usual."""

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, n

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kw)
        return torch.cat([torch.zeros_like(out[:, :self.n]), out[:, self.n:]], dim=1)


class _MaskedSelfAttention:
    """diffusers' own self-attention processor, given a boolean ``[N, N]`` mask (True: may read)."""

    def __init__(self, inner, mask: torch.Tensor):
        self.inner, self.mask = inner, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb, **kw)


@pytest.mark.parametrize("mode", ["joint", "cached"])
def test_wan_context_modes_match_diffusers_blocks_over_context_and_target(mode):
    # diffusers' own WanTransformer3DModel over [k context frames ; target frames], the context at
    # timestep 0 and the target at t (its per-token timesteps, as Wan 2.2 TI2V feeds them), its
    # cross-attention blind for the context rows, and in cached mode a mask letting context tokens
    # read only context tokens of their own or earlier frames: its target frames are our velocity
    # for the target given those frames' patch embeddings as context
    from diffusers import WanTransformer3DModel

    from pfp.backbones.rope import grid_positions
    from pfp.compressor import Context
    bb = tiny_wan_backbone(mode)
    up = WanTransformer3DModel.from_config(bb.transformer.config).eval()
    up.load_state_dict(bb.transformer.state_dict())
    k, b = 2, 2
    x_full = torch.randn(b, 4, k + 2, 4, 6, generator=torch.Generator().manual_seed(0))
    t, text = torch.tensor([0.3, 0.8]), torch.randn(b, 5, 16, generator=torch.Generator().manual_seed(1))
    grid = bb.token_grid(*x_full.shape[2:])
    hw = grid[1] * grid[2]
    nc, n = k * hw, grid[0] * hw
    for blk in up.blocks:
        blk.attn2.set_processor(_ContextBlindCrossAttention(blk.attn2.processor, nc))
        if mode == "cached":
            frame = torch.arange(n) // hw
            allowed = torch.ones(n, n, dtype=torch.bool)
            allowed[:nc] = (frame[None, :] <= frame[:nc, None]) & (torch.arange(n)[None, :] < nc)
            blk.attn1.set_processor(_MaskedSelfAttention(blk.attn1.processor, allowed))
    per_token = torch.cat([torch.zeros(b, nc), (t * 1000)[:, None].expand(b, n - nc)], dim=1)
    with torch.no_grad():
        want = up(x_full, per_token, text, return_dict=False)[0][:, :, k:]
        tokens = bb.patch_embed(x_full[:, :, :k]).flatten(2).transpose(1, 2)
        ctx = Context(tokens, grid_positions(k, grid[1], grid[2]))
        got = bb(x_full[:, :, k:], t, text, bb.cache_context(ctx) if mode == "cached" else ctx, t_start=k)
    torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=0)
    if mode == "cached":   # the context is read: without it the target differs
        assert (bb(x_full[:, :, k:], t, text, None, t_start=k) - want).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Context.mask: histories of different lengths in one batch
# ----------------------------------------------------------------------------------------------

def _wan_bb(mode):
    return tiny_wan_backbone(mode)


def _masked_vs_alone(bb, frames, path):
    """Run a batch whose sample b has ``frames[b]`` real context token frames (of 3, padded), and each
    sample alone with only its real tokens; ``path``: "context" (a Context into forward) or "cache"
    (cache_context, then forward with the ContextKV; "buffer": the same through the ContextKV's
    [context ; target] buffers). fp32 (the backbones keep the adaLN modulation
    in fp32 whatever the dtype), so a tight fp32 tolerance: the padded batch takes one masked
    attention call where each sample alone takes an unmasked one."""
    from pfp.compressor import Context
    b, per = len(frames), 2                                  # 1x2 context tokens per token frame
    base = _context(3, 1, 2, bb.inner_dim, batch=b)
    tokens = base.tokens
    token_frame = torch.arange(3).repeat_interleave(per)
    mask = token_frame[None, :] < torch.tensor(frames)[:, None]
    torch.manual_seed(1)
    x = torch.randn(b, bb.latent_channels, 2, 4, 4)
    t = torch.rand(b)
    text = torch.randn(b, 5, 16)
    text_mask = torch.ones(b, 5, dtype=torch.bool)
    text_mask[0, 3:] = False

    bb.use_context_kv_buffers(path == "buffer")

    def run(ctx, xs, ts, txt, tm):
        if path in ("cache", "buffer") and ctx is not None:
            ctx = bb.cache_context(ctx)
        return bb(xs, ts, txt, ctx, t_start=6, text_mask=tm)

    with torch.no_grad():
        out = run(Context(tokens, base.positions, mask), x, t, text, text_mask)
        assert torch.isfinite(out).all()
        for i, f in enumerate(frames):
            n = f * per
            alone = Context(tokens[i:i + 1, :n], base.positions[:n]) if n else None
            ref = run(alone, x[i:i + 1], t[i:i + 1], text[i:i + 1], text_mask[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], ref, atol=2e-6, rtol=1e-5)
        # the padded tokens' values do not matter
        junk = tokens.clone()
        junk[~mask] = 1e3
        torch.testing.assert_close(run(Context(junk, base.positions, mask), x, t, text, text_mask), out,
                                   atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("frames", [(3, 1, 2), (2, 0)])
@pytest.mark.parametrize("mode,path", [("joint", "context"), ("cached", "context"), ("cached", "cache"),
                                       ("cached", "buffer")])
def test_tiny_dit_honours_context_mask(mode, path, frames):
    _masked_vs_alone(_tiny(mode), frames, path)


@pytest.mark.parametrize("frames", [(3, 1, 2), (2, 0)])
@pytest.mark.parametrize("mode,path", [("joint", "context"), ("cached", "context"), ("cached", "cache"),
                                       ("cached", "buffer")])
def test_wan_backbone_honours_context_mask(mode, path, frames):
    _masked_vs_alone(_wan_bb(mode), frames, path)


def test_masked_training_step_gets_no_gradient_from_padding():
    from pfp.compressor import Context
    bb = _tiny("cached")
    ctx = _context(3, 1, 2, bb.inner_dim, batch=2)
    tokens = ctx.tokens.clone().requires_grad_()
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    x = torch.randn(2, bb.latent_channels, 2, 4, 4)
    bb(x, torch.tensor([0.3, 0.6]), torch.randn(2, 5, 16),
       Context(tokens, ctx.positions, mask), t_start=6).square().sum().backward()
    assert torch.all(tokens.grad[~mask] == 0) and tokens.grad[mask].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# blocks are real modules: hooks on them see every call
# ----------------------------------------------------------------------------------------------
def _tiny_backbones():
    from pfp.backbones.tiny_dit import TinyDiT
    yield "tiny", TinyDiT(latent_channels=4, inner_dim=24, depth=2, num_heads=2, text_dim=16, freq_dim=16)
    import importlib.util
    if importlib.util.find_spec("diffusers") is not None:
        yield "wan", tiny_wan_backbone()


def test_text_of_the_wrong_width_is_named():
    # text states of another encoder (e.g. 4096-wide UMT5 into a 16-wide model) fail with a line
    # naming `text` and the width the backbone takes, not inside a linear layer
    for name, bb in _tiny_backbones():
        with pytest.raises(ValueError, match=r"text must be \[B, L, 16\] states"):
            bb(torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5]), torch.randn(1, 5, 12))
        assert bb(torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5]), torch.randn(1, 5, 16)).shape == (1, 4, 2, 4, 4)


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_every_block_call_goes_through_the_block_module(mode):
    # what FSDP's fully_shard, diffusers' offload and casting hooks rely on: the backbone runs each
    # block by calling it, in forward and in cache_context alike, with and without checkpointing
    from pfp.backbones.wan_style import WanStyleBlock
    for name, bb in _tiny_backbones():
        bb.context_mode = mode
        assert all(isinstance(blk, WanStyleBlock) for blk in bb.blocks), name
        calls = []
        for i, blk in enumerate(bb.blocks):
            blk.register_forward_pre_hook(lambda m, args, i=i: calls.append(i))
        x, t, text = torch.randn(2, 4, 2, 4, 4), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 16)
        ctx = _context(1, 1, 2, bb.inner_dim)
        with torch.no_grad():
            context = bb.cache_context(ctx) if mode == "cached" else ctx
            assert calls == ([0, 1] if mode == "cached" else []), (name, calls)
            calls.clear()
            bb(x, t, text, context, t_start=4)
        assert calls == [0, 1], (name, mode, calls)
        calls.clear()
        bb.set_gradient_checkpointing(True)
        bb(x, t, text, ctx, t_start=4).square().mean().backward()   # recomputed blocks: called again
        assert calls.count(0) == calls.count(1) == 2, (name, mode, calls)


def test_diffusers_block_offload_hooks_fire_under_the_pfp_forward():
    pytest.importorskip("diffusers")
    from diffusers.hooks import apply_group_offloading
    bb = dict(_tiny_backbones())["wan"].eval()
    x, t, text = torch.randn(2, 4, 2, 4, 4), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 16)
    ctx = _context(1, 1, 2, bb.inner_dim)
    with torch.no_grad():
        want = bb(x, t, text, bb.cache_context(ctx), t_start=4)
    cpu = torch.device("cpu")
    apply_group_offloading(bb.transformer, onload_device=cpu, offload_device=cpu, offload_type="block_level",
                           num_blocks_per_group=1)
    onloads = []
    for i, blk in enumerate(bb.blocks):                # count each block group's onloads
        group = blk._diffusers_hook.get_hook("group_offloading").group
        group.onload_ = lambda real=group.onload_, i=i: onloads.append(i) or real()
    with torch.no_grad():
        got = bb(x, t, text, bb.cache_context(ctx), t_start=4)
    assert onloads == [0, 1, 0, 1]                   # cache_context, then the denoising forward
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# reduced precision: weights in bf16/fp16, inputs in any float dtype
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_wan_loaded_in_reduced_precision_runs_every_path(tmp_path, dtype, tol):
    # from_pretrained(torch_dtype=bf16) keeps diffusers' _keep_in_fp32_modules (the time embedder,
    # the norms, the modulation tables) in fp32: the forward must mix them as diffusers does, take
    # fp32 latents, text and context tokens, and the sampler must keep its latents in fp32
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    from pfp.backbones import WanBackbone
    from pfp.sampler import sample
    tiny_wan_backbone().transformer.save_pretrained(tmp_path / "wan")
    ref = WanBackbone.from_pretrained(str(tmp_path / "wan")).eval()
    low = WanBackbone.from_pretrained(str(tmp_path / "wan"), torch_dtype=dtype).eval()
    assert low.compute_dtype == dtype
    if dtype == torch.bfloat16:
        assert low.transformer.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    x, t, text = torch.randn(2, 4, 2, 4, 4), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 16)
    ctx = _context(1, 1, 2, 24)
    # parity: diffusers' own forward in the same dtype, within one step of that dtype at the
    # output's magnitude
    upstream = WanTransformer3DModel.from_pretrained(str(tmp_path / "wan"), torch_dtype=dtype).eval()
    with torch.no_grad():
        want = upstream(x.to(dtype), t * 1000, text.to(dtype), return_dict=False)[0].float()
        got = low(x, t, text).float()
    one_step = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(want.abs().max().item()))
    assert (got - want).abs().max() <= one_step, ((got - want).abs().max(), one_step)
    with torch.no_grad():
        for mode in ("cached", "joint"):
            ref.context_mode = low.context_mode = mode
            c_ref = ref.cache_context(ctx) if mode == "cached" else ctx
            c_low = low.cache_context(ctx) if mode == "cached" else ctx
            want, got = ref(x, t, text, c_ref, t_start=4), low(x, t, text, c_low, t_start=4)
            assert got.dtype == dtype
            assert (got.float() - want).abs().max() <= tol * max(1.0, want.abs().max().item()), mode
            args = dict(uncond_text=torch.zeros_like(text[:1]), steps=3, cfg=2.0, seed=1, t_start=4)
            want = sample(ref, (1, 4, 2, 4, 4), text[:1], c_ref, **args)
            got = sample(low, (1, 4, 2, 4, 4), text[:1], c_low, **args)
            assert got.dtype == torch.float32
            assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item()), mode


def test_wan_conditions_on_zero_padded_text_as_upstream_does():
    # WanPipeline zero-pads the text states to max_length and passes no mask, so Wan attends to the
    # pads; by default our adapter does the same even when the text encoder hands it a mask
    # (UMT5TextEncoder does), and mask_text_padding=True is the named departure that skips them
    bb = tiny_wan_backbone()
    from diffusers import WanTransformer3DModel
    upstream = WanTransformer3DModel.from_config(bb.transformer.config).eval()
    upstream.load_state_dict(bb.transformer.state_dict())
    x, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([0.3, 0.8])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :5], mask[1, :11] = True, True
    text = torch.randn(2, 16, 16) * mask[..., None]                     # real tokens, then zeros
    with torch.no_grad():
        want = upstream(x, t * 1000, text, return_dict=False)[0]
        torch.testing.assert_close(bb(x, t, text, text_mask=mask), want, atol=1e-5, rtol=1e-4)
        bb.mask_text_padding = True
        departed = bb(x, t, text, text_mask=mask)
    assert (departed - want).abs().max() > 1e-3                         # the option does change it
