"""pfp.MemoryCompressor: token grids and positions, streaming equality, gradients, bad input,
mixing and checkpoints. Small widths and sizes throughout; the paper-scale check runs on the
meta device (shapes only)."""
import math
import random
from typing import Optional

import pytest
import torch
from torch import nn

import pfp
from pfp.rates import stage_plan
from pfp_kernels.testing import assert_close

SMALL_HIDDEN = (8, 12, 16, 20)


# every output is NaN-poisoned before each test's kernels write it (conftest.py)
pytestmark = pytest.mark.usefixtures("poison_uninitialised")


def make(rate="4x4x2", channels=4, inner=24, hidden=SMALL_HIDDEN, zero_init=False, dtype=torch.float32, **kw):
    pe = nn.Conv3d(channels, inner, (1, 2, 2), (1, 2, 2))
    return pfp.MemoryCompressor(pe, channels, inner, rate, hidden, zero_init=zero_init, **kw).to(dtype)


def inputs(c, t, h, w, batch=2, dtype=torch.float32):
    hr = torch.randn(batch, c.latent_channels, t, h, w, dtype=dtype)
    lr = torch.randn(*c.expected_lr_shape(hr.shape), dtype=dtype)
    return hr, lr




# ----------------------------------------------------------------------------------------------
# rates, plans, grids, positions
# ----------------------------------------------------------------------------------------------
# 832x480, 20 s at 24 fps, VAE 8x8x4, patch (1,2,2): HR latent 120x60x104.
PAPER_GRIDS = {"4x4x2": (60, 7, 13), "2x2x2": (60, 15, 26), "2x2x4": (30, 15, 26),
               "2x2x1": (120, 15, 26), "2x2x8": (15, 15, 26)}


def test_paper_check_5460_via_plan():
    plan = pfp.plan_inputs((832, 480), fps=24, seconds=20, rate="4x4x2", vae_spatial=8, vae_temporal=4,
                           latent_channels=16, patch=(1, 2, 2))
    assert plan.hr_frames == 480 and plan.hr_latent_shape == (16, 120, 60, 104)
    assert plan.token_grid == (60, 7, 13) and plan.num_tokens == 5460
    assert plan.lr_video_size == (208, 120) and plan.lr_fps == 12 and plan.lr_frames == 240
    assert plan.lr_latent_shape == (16, 60, 15, 26)
    assert plan.hr_rows_cols_used == (56, 104)
    assert "5460 tokens" in str(plan)


@pytest.mark.parametrize("rate", sorted(PAPER_GRIDS))
def test_presets_plan_and_stage_strides(rate):
    plan = pfp.plan_inputs((832, 480), 24, 20, rate)
    assert plan.token_grid == PAPER_GRIDS[rate]
    r = pfp.parse_rate(rate)
    specs = stage_plan(r, (1, 2, 2), 16, (64, 128, 256, 512))
    total = [math.prod(s.stride[i] for s in specs) for i in range(3)]
    assert total == [r.t, 2 * r.h, 2 * r.w]
    for s in specs:  # every input frame/pixel is read: kernel >= stride on every axis
        assert all(k >= st for k, st in zip(s.kernel, s.stride))
    # The LR latent planned for the video lands on the same grid after the (1,2,2) patchify.
    assert plan.lr_latent_shape[1] == plan.token_grid[0]
    assert plan.lr_latent_shape[2] // 2 == plan.token_grid[1] and plan.lr_latent_shape[3] // 2 == plan.token_grid[2]


def test_default_stage_plan_is_the_benchmarked_one():
    specs = stage_plan("4x4x2", (1, 2, 2), 16, (64, 128, 256, 512))
    assert [s.stride for s in specs] == [(2, 1, 1), (1, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert [s.kernel for s in specs] == [(3, 3, 3)] * 4
    assert [(s.in_channels, s.out_channels) for s in specs] == [(16, 64), (64, 128), (128, 256), (256, 512)]
    assert [s.stride for s in stage_plan("2x2x8", (1, 2, 2), 16, (64, 128, 256, 512))] == \
        [(4, 1, 1), (2, 1, 1), (1, 2, 2), (1, 2, 2)]
    assert [s.stride for s in stage_plan("2x2x1", (1, 2, 2), 16, (64, 128, 256, 512))] == \
        [(1, 2, 2), (1, 2, 2), (1, 1, 1), (1, 1, 1)]


def test_paper_scale_shapes_on_meta_device():
    pe = nn.Conv3d(16, 3072, (1, 2, 2), (1, 2, 2), device="meta")
    c = pfp.MemoryCompressor(pe, 16, 3072, "4x4x2", impl="torch")
    hr = torch.empty(1, 16, 120, 60, 104, device="meta")
    assert c.expected_lr_shape(hr.shape) == (1, 16, 60, 15, 26)
    ctx = c(hr, torch.empty(1, 16, 60, 15, 26, device="meta"))
    assert tuple(ctx.tokens.shape) == (1, 5460, 3072)
    assert tuple(ctx.positions.shape) == (5460, 3)


@pytest.mark.parametrize("rate", ["4x4x2", "2x2x2", "2x2x4", "2x2x1", "2x2x8", "1x1x1", "4x2x8"])
def test_token_count_and_positions(rate):
    c = make(rate)
    r = c.rate
    fh, fw = 2 * r.h, 2 * r.w
    t, h, w = 2 * r.t + 1, 2 * fh + 1, 3 * fw + 1   # odd sizes: time ceils, space floors
    hr, lr = inputs(c, t, h, w, batch=1)
    ctx = c(hr, lr)
    grid = (math.ceil(t / r.t), h // fh, w // fw)
    assert grid == (3, 2, 3) and c.token_grid((t, h, w)) == grid
    assert tuple(ctx.tokens.shape) == (1, math.prod(grid), c.inner_dim) and ctx.mask is None
    pos = ctx.positions.reshape(*grid, 3)
    j = torch.arange(grid[0], dtype=torch.float32)
    a, b = torch.arange(grid[1], dtype=torch.float32), torch.arange(grid[2], dtype=torch.float32)
    assert torch.equal(pos[:, 0, 0, 0], r.t * j - (r.t - 1) / 2)
    assert torch.equal(pos[0, :, 0, 1], r.h * a + (r.h - 1) / 2)
    assert torch.equal(pos[0, 0, :, 2], r.w * b + (r.w - 1) / 2)
    assert ctx.positions.dtype == torch.float32 and torch.isfinite(ctx.tokens).all()


def test_zero_init_context_is_the_patch_embedding_of_the_lr_latent():
    # With the HR projection at zero, the context is exactly the backbone's tokens for the LR
    # latent, at positions on the backbone's own token grid (rate 1x1x1: integer coordinates).
    c = make("1x1x1", zero_init=True)
    hr, lr = inputs(c, 3, 4, 6)
    ctx = c(hr, lr)
    want = c.patch_embed(lr).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ctx.tokens, want, rtol=0, atol=0)
    grid = torch.stack(torch.meshgrid(torch.arange(3.), torch.arange(2.), torch.arange(3.), indexing="ij"), -1)
    assert torch.equal(ctx.positions, grid.reshape(-1, 3))


def test_hr_branch_reads_only_the_floored_region():
    c = make("4x4x2")
    hr, lr = inputs(c, 4, 9, 17, batch=1)   # grid 1x2 from 8x16 rows x cols
    base = c(hr, lr).tokens
    hr2, lr2 = hr.clone(), lr.clone()
    hr2[..., 8:, :] = 1e3
    hr2[..., :, 16:] = 1e3
    torch.testing.assert_close(c(hr2, lr2).tokens, base, rtol=0, atol=0)
    hr2[..., 7, 15] += 1.0
    assert not torch.equal(c(hr2, lr2).tokens, base)


def test_time_is_causal_and_padded_histories_are_masked():
    c = make("4x4x2")
    hr, lr = inputs(c, 7, 8, 8, batch=2)
    ctx = c(hr, lr, hr_frames=[7, 3])
    # sample 1 has 3 real HR frames -> ceil(3/2) = 2 real token frames of 4
    assert ctx.mask is not None and ctx.lengths.tolist() == [ctx.num_tokens, 2 * 1 * 1]
    short = c(hr[1:, :, :3], lr[1:, :, :2]).tokens
    real = ctx.tokens[1][ctx.mask[1]]
    torch.testing.assert_close(real, short[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hr_frames"):
        c(hr, lr, hr_frames=[8, 3])
    # a sample with no history at all: every token masked
    assert c(hr, lr, hr_frames=[7, 0]).lengths.tolist() == [ctx.num_tokens, 0]


# ----------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------
def random_plan(rng, total, max_chunk):
    sizes = []
    while total > 0:
        n = min(total, rng.choice([0, 1, 1, 2, 3, max_chunk]))
        sizes.append(n)
        total -= n
    return sizes


@pytest.mark.parametrize("kind", pfp.COMPRESSOR_KINDS)
@pytest.mark.parametrize("rate,seed", [("4x4x2", 0), ("4x4x2", 1), ("2x2x8", 2), ("2x2x1", 3), ("2x2x4", 4)])
def test_stream_equals_full_call_over_random_chunk_plans(rate, seed, kind):
    rng = random.Random(seed)
    c = make(rate, kind=kind)
    r = c.rate
    t = rng.randint(1, 3 * r.t + 3)
    hr, lr = inputs(c, t, 2 * 2 * r.h + 1, 2 * 2 * r.w, batch=2)
    full = c(hr, lr)
    hr_plan = random_plan(rng, hr.shape[2], 5)
    lr_plan = random_plan(rng, lr.shape[2], 3)
    # Interleave: sometimes LR runs ahead, sometimes HR does; pad the shorter plan with Nones.
    n = max(len(hr_plan), len(lr_plan))
    hr_plan += [None] * (n - len(hr_plan))
    lr_plan += [None] * (n - len(lr_plan))
    stream = c.stream(2)
    outs, i, k = [], 0, 0
    for step, (a, b) in enumerate(zip(hr_plan, lr_plan)):
        hc = hr[:, :, i:i + a] if a is not None else (None if step else hr[:, :, :0])
        lc = lr[:, :, k:k + b] if b is not None else (None if step else lr[:, :, :0])
        new = stream.append(hc, lc)
        assert new.positions.shape[0] == new.tokens.shape[1]
        outs.append(new)
        i, k = i + (a or 0), k + (b or 0)
    tokens = torch.cat([o.tokens for o in outs], dim=1)
    positions = torch.cat([o.positions for o in outs], dim=0)
    assert tokens.shape == full.tokens.shape
    assert_close(tokens, full.tokens, kind="stream")
    assert torch.equal(positions, full.positions)
    ctx = stream.context
    assert torch.equal(ctx.tokens, tokens) and torch.equal(ctx.positions, full.positions)


@pytest.mark.parametrize("kind", [k for k in pfp.COMPRESSOR_KINDS if k != "only_lr"])
@pytest.mark.parametrize("rate", ["4x4x2", "2x2x8", "2x2x1"])
def test_stream_replayed_steps_equal_the_plain_stream(rate, kind):
    """cuda_graph=True: appends that repeat a shape at a phase run as a recorded step (on a CPU the
    same step code without a graph), from each conv state at its phase; the tokens, positions,
    features and the states left behind equal the plain stream's, through chunk sizes that change
    and chunks that leave frames pending."""
    torch.manual_seed(0)
    c = make(rate, kind=kind)
    rt = c.rate.t
    hr, lr = inputs(c, 13 * rt, 2 * 2 * c.rate.h + 1, 2 * 2 * c.rate.w, batch=2)
    plans = [[rt] * 6 + [1, 2 * rt - 1] + [2 * rt] * 3 + [rt], [2 * rt] * 6 + [rt]]
    for plan in plans:
        plain, stepped = c.stream(2), c.stream(2, keep_features=True, cuda_graph=True)
        i = 0
        with torch.no_grad():
            for n in plan:
                a, b = i, i + n
                hc, lc = hr[:, :, a:b], lr[:, :, -(-a // rt): -(-b // rt)]
                want, got = plain.append(hc, lc), stepped.append(hc, lc)
                assert torch.equal(got.tokens, want.tokens) and torch.equal(got.positions, want.positions)
                for x, y in ((got.order, want.order), (got.features, want.features)):
                    assert (x is None) == (y is None) and (x is None or torch.equal(x, y))
                for s, t in zip(stepped._states, plain._states):
                    assert s.frames_seen == t.frames_seen and (s.frames is None) == (t.frames is None)
                    assert s.frames is None or torch.equal(s.frames, t.frames)
                i = b
        assert stepped.replayed_appends >= 3 and stepped.num_emitted_frames == plain.num_emitted_frames
        if c.has_features:
            assert stepped.context.features.shape[1] == stepped.num_tokens
    # with gradients on, every append runs as usual
    stream = c.stream(2, cuda_graph=True)
    for k in range(4):
        stream.append(hr[:, :, k * rt:(k + 1) * rt], lr[:, :, k:k + 1])
    assert stream.replayed_appends == 0


def test_stream_graph_bookkeeping_with_a_stand_in_for_cuda_graphs(monkeypatch):
    """The CUDA-graph path of cuda_graph=True, on a CPU: a stand-in 'graph' reruns the captured
    function into the same output tensors on replay, as a CUDA graph rewrites its pool. The chunk
    and states must go through the graph's own input buffers, every result must be copied out
    before the next replay, a replaced parameter must make a new capture, and a hook on a module
    must keep the graph off (a replay would not run it)."""
    import pfp.compressor as pc

    captures = []
    _use_stand_in_graphs(monkeypatch, captures)
    torch.manual_seed(1)
    c = make("4x4x2").eval()
    hr, lr = inputs(c, 32, 9, 8, batch=2)
    plain, graphed = c.stream(2), c.stream(2, keep_features=True, cuda_graph=True)
    with torch.no_grad():
        for k in range(11):
            if k == 7:
                c.proj.weight = nn.Parameter(c.proj.weight * -1)
            hc, lc = hr[:, :, 2 * k:2 * k + 2], lr[:, :, k:k + 1]
            want, got = plain.append(hc, lc), graphed.append(hc, lc)
            assert torch.equal(got.tokens, want.tokens) and torch.equal(got.features, want.features)
        # the states are values: a replay does not rewrite the frames an earlier append left
        held = [(s.frames, s.frames.clone()) for s in graphed._states]
        hc, lc = hr[:, :, 22:24], lr[:, :, 11:12]
        assert torch.equal(graphed.append(hc, lc).tokens, plain.append(hc, lc).tokens)
        assert all(torch.equal(a, b) for a, b in held)
        assert len(captures) == 2
        c.patch_embed.register_buffer("seen", torch.zeros(1))   # a new or replaced buffer: a new capture
        hc, lc = hr[:, :, 24:26], lr[:, :, 12:13]
        assert torch.equal(graphed.append(hc, lc).tokens, plain.append(hc, lc).tokens)
        assert len(captures) == 3
        c.impl = "torch"   # another implementation: another step, recorded, then captured
        for k in (13, 14):
            hc, lc = hr[:, :, 2 * k:2 * k + 2], lr[:, :, k:k + 1]
            assert torch.equal(graphed.append(hc, lc).tokens, plain.append(hc, lc).tokens)
        c.impl = "auto"
        assert len(captures) == 4
        hooked = []
        handle = c.stages[0].register_forward_hook(lambda *a: hooked.append(1))
        try:
            hc, lc = hr[:, :, 30:32], lr[:, :, 15:16]
            assert torch.equal(graphed.append(hc, lc).tokens, plain.append(hc, lc).tokens)
        finally:
            handle.remove()
    # appends 0-2 run as usual (the start, then each of two phases seen once), 3-12 replay, 13 runs
    # as usual (a new impl) and 14 replays; the hooked one runs its recorded step without the
    # graph, so its hook runs (twice: both streams)
    assert len(captures) == 4 and graphed.replayed_appends == 12 and hooked == [1, 1]
    assert graphed.graph_replays == 11   # all of them but the hooked one
    assert torch.equal(graphed.context.tokens[:, : plain.num_tokens], plain.context.tokens)

    # a step that cannot be captured: one warning, then the stream runs its steps without graphs
    def failing(run, device):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(pc, "_capture", failing)
    stream = c.stream(2, cuda_graph=True)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph") as record:
        got = [stream.append(hr[:, :, 2 * k:2 * k + 2], lr[:, :, k:k + 1]).tokens for k in range(6)]
    assert sum("could not be captured" in str(w.message) for w in record) == 1
    want = c.stream(2)
    with torch.no_grad():
        for k, tokens in enumerate(got):
            assert torch.equal(tokens, want.append(hr[:, :, 2 * k:2 * k + 2], lr[:, :, k:k + 1]).tokens)
    assert stream.replayed_appends == 3 and stream.graph_replays == 0


@pytest.mark.parametrize("kind,rate", [("large_patchify", "4x4x1"), ("without_lr", "2x2x1")])
def test_stream_graph_with_stages_that_keep_no_frames(monkeypatch, kind, rate):
    # a stage of temporal kernel 1 keeps no frames (None in its state): nothing to copy in or out
    _use_stand_in_graphs(monkeypatch)
    torch.manual_seed(2)
    c = make(rate, kind=kind).eval()
    hr, lr = inputs(c, 8, 8, 8, batch=1)
    plain, graphed = c.stream(1), c.stream(1, cuda_graph=True)
    with torch.no_grad():
        for k in range(8):
            hc, lc = hr[:, :, k:k + 1], lr[:, :, k:k + 1]
            assert torch.equal(graphed.append(hc, lc).tokens, plain.append(hc, lc).tokens), k
    assert graphed.graph_replays > 0


def _flat(outputs):
    tokens, features, frames = outputs
    return [t for t in (tokens, features, *frames) if t is not None]


class _StandInGraph:
    """A CUDA graph's stand-in on a CPU: a replay reruns the captured function into the same output
    tensors, as a CUDA graph rewrites its memory pool."""

    def __init__(self, run, outputs):
        self.run, self.outputs = run, outputs

    def replay(self):
        for dst, src in zip(_flat(self.outputs), _flat(self.run())):
            dst.copy_(src)


def _use_stand_in_graphs(monkeypatch, captures: Optional[list] = None) -> None:
    """CompressorStream's graph path on CPU tensors, capturing stand-ins (each capture's device is
    appended to ``captures``)."""
    import pfp.compressor as pc

    def capture(run, device):
        if captures is not None:
            captures.append(device)
        outputs = run()
        return _StandInGraph(run, outputs), outputs
    monkeypatch.setattr(pc, "_GRAPH_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(pc, "_capture", capture)


def test_stream_one_frame_at_a_time_and_buffers_without_dropping():
    c = make("4x4x2")
    hr, lr = inputs(c, 9, 8, 8, batch=1)
    full = c(hr, lr)
    stream = c.stream(1)
    # All LR frames first: nothing can be emitted before their HR features exist.
    assert stream.append(hr[:, :, :0], lr).num_tokens == 0
    counts = [stream.append(hr[:, :, f:f + 1], None).num_tokens for f in range(9)]
    assert counts == [1, 0, 1, 0, 1, 0, 1, 0, 1]      # token j appears with HR frame 2j
    assert_close(stream.context.tokens, full.tokens, kind="stream")
    # Now HR first: tokens wait for their LR frames.
    stream = c.stream(1)
    assert stream.append(hr, lr[:, :, :0]).num_tokens == 0
    assert [stream.append(None, lr[:, :, f:f + 1]).num_tokens for f in range(5)] == [1] * 5
    assert_close(stream.context.tokens, full.tokens, kind="stream")


def test_stream_buffers_stay_bounded():
    # Append cost independent of history: what the stream keeps between appends is bounded.
    c = make("4x4x2")
    stream = c.stream(1)
    sizes = []
    for _ in range(12):
        hr, lr = inputs(c, 4, 8, 8, batch=1)   # 4 HR frames -> 2 tokens; 2 LR frames
        stream.append(hr, lr)
        kept = sum(s.frames.shape[2] for s in stream._states if s is not None and s.frames is not None)
        sizes.append(kept)
    assert max(sizes) <= sum(s.kernel[0] - 1 for s in c.specs)
    assert stream._hr_pending is None or stream._hr_pending.shape[2] <= 1


def test_stream_gradients_match_full_call():
    c = make("4x4x2")
    hr, lr = inputs(c, 5, 8, 8, batch=1)
    w = torch.randn(1, 3 * 1 * 1, c.inner_dim)
    (c(hr, lr).tokens * w).sum().backward()
    want = {n: p.grad.clone() for n, p in c.named_parameters()}
    c.zero_grad()
    stream = c.stream(1)
    parts = [stream.append(hr[:, :, :2], lr[:, :, :1]).tokens, stream.append(hr[:, :, 2:], lr[:, :, 1:]).tokens]
    (torch.cat(parts, 1) * w).sum().backward()
    for n, p in c.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------
# gradients and configurations
# ----------------------------------------------------------------------------------------------
def test_gradients_reach_both_branches_and_the_shared_patch_embedding():
    c = make("4x4x2")
    with torch.no_grad():
        c.proj.weight.normal_(0, 0.1)
    hr, lr = inputs(c, 4, 8, 8)
    c(hr, lr).tokens.square().mean().backward()
    for name, p in c.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert c.patch_embed.weight.grad.abs().sum() > 0


def test_zero_init_projection_still_gets_a_gradient():
    c = make("4x4x2", zero_init=True)
    assert c.proj.weight.abs().sum() == 0 and c.proj.bias.abs().sum() == 0
    hr, lr = inputs(c, 4, 8, 8)
    c(hr, lr).tokens.square().mean().backward()
    assert c.proj.weight.grad.abs().sum() > 0 and c.patch_embed.weight.grad.abs().sum() > 0
    # The stages see gradient only through the projection, which is zero at the first step.
    assert all(s.weight.grad.abs().sum() == 0 for s in c.stages)


@pytest.mark.parametrize("kind,hidden", [("pfp", (64, 128, 256, 512)), ("without_lr", (32, 64, 128))])
def test_fresh_hr_stages_keep_the_signal_scale(kind, hidden):
    # Each conv + SiLU stage of a fresh compressor keeps a unit input's rms within a factor of 2
    # (He init with SiLU's gain). nn.Conv3d's default init shrinks it ~3.5x per stage, which would
    # leave a 4-stage branch at 1/150 of its input. Interior positions only: zero padding at the
    # borders of the small spatial grids lowers the edge rms for any init.
    torch.manual_seed(0)
    c = pfp.MemoryCompressor(nn.Conv3d(48, 128, (1, 2, 2), (1, 2, 2)), 48, 128, "2x2x2", hidden, kind=kind)
    h = torch.randn(2, 48, 16, 48, 48).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        for stage in c.stages:
            h, _ = stage(h)
            rms = h[..., 1:-1, 1:-1].float().pow(2).mean().sqrt().item()
            assert 0.5 < rms < 2.0, (kind, tuple(stage.weight.shape), rms)
        tokens = c.proj(h)
    if kind == "pfp":  # the projection still starts at zero: the LR tokens alone at first
        assert c.proj.weight.abs().sum() == 0 and c.proj.bias.abs().sum() == 0
    else:  # nn.Linear's init: tokens at about the patch embedding's scale
        assert 0.1 < tokens.pow(2).mean().sqrt().item() < 2.0

@pytest.mark.parametrize("channels,inner", [(16, 32), (48, 40)])
def test_configurable_channels_and_width(channels, inner):
    c = make("2x2x2", channels=channels, inner=inner, hidden=(8, 16))
    hr, lr = inputs(c, 3, 8, 8, batch=1)
    ctx = c(hr, lr)
    assert tuple(ctx.tokens.shape) == (1, 2 * 2 * 2, inner)
    assert c.stages[0].weight.shape[1] == channels


def test_bf16_runs_and_keeps_dtype():
    c = make("4x4x2", dtype=torch.bfloat16)
    hr, lr = inputs(c, 4, 8, 8, dtype=torch.bfloat16)
    ctx = c(hr, lr)
    assert ctx.tokens.dtype == torch.bfloat16 and ctx.positions.dtype == torch.float32
    ref = make("4x4x2")
    ref.load_state_dict({k: v.float() for k, v in c.state_dict().items()})
    assert_close(ctx.tokens, ref(hr.float(), lr.float()).tokens, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# mixing
# ----------------------------------------------------------------------------------------------
def test_mixing_two_compressors_merges_by_arrival_with_own_positions():
    pe = nn.Conv3d(4, 24, (1, 2, 2), (1, 2, 2))
    a = pfp.MemoryCompressor(pe, 4, 24, "4x4x2", SMALL_HIDDEN, zero_init=False)
    b = pfp.MemoryCompressor(pe, 4, 24, "2x2x8", SMALL_HIDDEN, zero_init=False)
    hr = torch.randn(2, 4, 16, 16, 16)
    ca = a(hr, torch.randn(*a.expected_lr_shape(hr.shape)))
    cb = b(hr, torch.randn(*b.expected_lr_shape(hr.shape)), hr_frames=[16, 8])
    # token frame j of a rate-t compressor is available at backbone frame t*j
    assert torch.equal(ca.order, (2.0 * torch.arange(8)).repeat_interleave(2 * 2))
    assert torch.equal(cb.order, (8.0 * torch.arange(2)).repeat_interleave(4 * 4))
    mixed = pfp.mix_contexts(ca, cb)
    assert mixed.num_tokens == ca.num_tokens + cb.num_tokens == 8 * 2 * 2 + 2 * 4 * 4
    # every token keeps its own position and mask bit; ties keep the argument order
    perm = torch.sort(torch.cat([ca.order, cb.order]), stable=True).indices
    assert torch.equal(mixed.tokens, torch.cat([ca.tokens, cb.tokens], 1)[:, perm])
    assert torch.equal(mixed.positions, torch.cat([ca.positions, cb.positions])[perm])
    assert torch.equal(mixed.mask, torch.cat([torch.ones_like(ca.tokens[..., 0], dtype=torch.bool), cb.mask], 1)[:, perm])
    assert torch.equal(mixed.order[:4], ca.order[:4]) and torch.equal(mixed.order[4:20], cb.order[:16])
    assert bool((mixed.order[1:] >= mixed.order[:-1]).all())
    assert pfp.mix_contexts([ca, ca]).mask is None
    with pfp.compressor.torch.no_grad():
        lr_end = pfp.MemoryCompressor(pe, 4, 24, "4x4x2", SMALL_HIDDEN, lr_phase="end")
        assert torch.equal(lr_end(hr, torch.randn(*a.expected_lr_shape(hr.shape))).order, ca.order + 1)
    with pytest.raises(ValueError, match="batch size"):
        pfp.mix_contexts(ca, pfp.Context(ca.tokens[:1], ca.positions))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_rates_and_patch_embeddings():
    for bad in ("3x4x2", "4x4", "0x2x2", (4, 4), "fast"):
        with pytest.raises(ValueError, match="rate"):
            pfp.parse_rate(bad)
    assert pfp.parse_rate((4, 4, 2)) == pfp.parse_rate("4x4x2") == pfp.Rate(4, 4, 2)
    with pytest.raises(ValueError, match="kernel == stride"):
        pfp.MemoryCompressor(nn.Conv3d(4, 24, 3, 1, 1), 4, 24)
    with pytest.raises(ValueError, match="latent_channels"):
        pfp.MemoryCompressor(nn.Conv3d(16, 24, (1, 2, 2), (1, 2, 2)), 48, 24)
    with pytest.raises(ValueError, match="temporal patch"):
        pfp.MemoryCompressor(nn.Conv3d(4, 24, 2, 2), 4, 24)
    with pytest.raises(ValueError, match="patch_size"):
        pfp.MemoryCompressor(nn.Linear(4, 24), 4, 24)
    with pytest.raises(ValueError, match="hidden"):
        pfp.MemoryCompressor(nn.Conv3d(4, 24, (1, 2, 2), (1, 2, 2)), 4, 24, hidden=())
    with pytest.raises(ValueError, match="multiple of the VAE"):
        pfp.plan_inputs((830, 480), 24, 20)
    with pytest.raises(ValueError, match="too small"):
        pfp.plan_inputs((32, 32), 24, 1, "4x4x2")


def test_wrong_channels():
    c = make("4x4x2")
    hr, lr = inputs(c, 4, 8, 8)
    with pytest.raises(ValueError, match="hr_latent has 5 channels.*latent_channels=4"):
        c(torch.randn(2, 5, 4, 8, 8), lr)
    with pytest.raises(ValueError, match="lr_latent has 3 channels"):
        c(hr, lr[:, :3])


def test_wrong_resolution_or_fps_for_the_rate_says_what_to_feed():
    c = make("4x4x2", channels=16, inner=24)
    hr = torch.randn(1, 16, 120, 60, 104)
    with pytest.raises(ValueError, match=r"needs an LR latent of 15x26.*1/4 height and 1/4 width"):
        c(hr, torch.randn(1, 16, 60, 30, 52))          # fed at 1/2 instead of 1/4 resolution
    with pytest.raises(ValueError, match=r"needs ceil\(120/2\) = 60 LR latent frames.*1/2 of the frame rate"):
        c(hr, torch.randn(1, 16, 120, 15, 26))         # fed at the full frame rate
    with pytest.raises(ValueError, match="needs at least 8x8"):
        c(torch.randn(1, 16, 2, 4, 104), torch.randn(1, 16, 1, 1, 26))
    with pytest.raises(ValueError, match="batch"):
        c(hr[:, :, :4], torch.randn(2, 16, 2, 15, 26))


def test_stream_batch_size_change_and_geometry_change():
    c = make("4x4x2")
    hr, lr = inputs(c, 2, 8, 8, batch=2)
    stream = c.stream(2)
    stream.append(hr, lr[:, :, :1])
    with pytest.raises(ValueError, match=r"batch size 1 but this stream was started with batch_size=2.*stream\(1\)"):
        stream.append(hr[:1], lr[:1])
    with pytest.raises(ValueError, match="same resolution"):
        stream.append(torch.randn(2, 4, 1, 16, 8), None)
    with pytest.raises(ValueError, match="first append must carry both"):
        c.stream(2).append(hr, None)
    with pytest.raises(ValueError, match="batch_size"):
        c.stream(0)


def test_dtype_and_device_mismatch():
    c = make("4x4x2")
    hr, lr = inputs(c, 2, 8, 8)
    with pytest.raises(ValueError, match="hr_latent is torch.bfloat16 on cpu but the compressor's parameters are torch.float32"):
        c(hr.bfloat16(), lr)
    with pytest.raises(ValueError, match="lr_latent is torch.float32 on meta"):
        c(hr, lr.to("meta"))
    stream = c.stream(2)
    stream.append(hr, lr[:, :, :1])
    with pytest.raises(ValueError, match="lr_chunk is torch.float64"):
        stream.append(None, lr.double())
    c.to(torch.float64)
    with pytest.raises(ValueError, match="after this stream started"):
        stream.append(hr.double(), None)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    c = make("4x4x2")
    path = tmp_path / "c.safetensors"
    c.save_checkpoint(path)
    d = make("4x4x2")
    d.load_checkpoint(path)
    hr, lr = inputs(c, 3, 8, 8)
    torch.testing.assert_close(d(hr, lr).tokens, c(hr, lr).tokens, rtol=0, atol=0)
    # Without the shared patch embedding, the backbone's own stays untouched.
    c.save_checkpoint(tmp_path / "no_pe.safetensors", include_patch_embed=False)
    e = make("4x4x2")
    pe_before = e.patch_embed.weight.clone()
    e.load_checkpoint(tmp_path / "no_pe.safetensors")
    assert torch.equal(e.patch_embed.weight, pe_before)
    assert torch.equal(e.proj.weight, c.proj.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "no_pe.safetensors"]


def test_checkpoint_from_another_config_names_the_tensors(tmp_path):
    path = tmp_path / "c.safetensors"
    make("4x4x2").save_checkpoint(path)
    other = make("2x2x8")     # stage 0 is (4,1,1) stride, kernel 5 in time
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"1 with other shapes: stages\.0\.weight \(checkpoint \(8, 4, 3, 3, 3\), model "
                                         r"\(8, 4, 5, 3, 3\)\).*checkpoint config: .*4x4x2"):
        other.load_checkpoint(path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())   # nothing loaded
    with pytest.raises(ValueError, match=r"2 unexpected in the checkpoint: stages\.3\.bias, stages\.3\.weight"):
        make("4x4x2", hidden=(8, 12, 16)).load_checkpoint(path)
    with pytest.raises(ValueError, match=r"2 missing from the checkpoint: stages\.4\.bias, stages\.4\.weight"):
        make("4x4x2", hidden=SMALL_HIDDEN + (24,)).load_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# the compressor over every pfp_kernels implementation that runs here
# ----------------------------------------------------------------------------------------------
def _impl_skip_reason(impl):
    from pfp_kernels.conv import conv_impl_reasons
    for op in ("causal_conv3d_act", "project_tokens"):
        probe = torch.zeros(1, 8, 1, 2, 2)
        why = conv_impl_reasons(op, probe, torch.zeros(4, 8, 1, 1, 1))[impl]
        if why is not None:
            return f"{impl} cannot run {op} here: {why}"
    if impl == "triton":
        try:
            import pfp_kernels.conv.triton  # noqa: F401
        except ImportError as exc:
            return f"the Triton conv kernels are not in this build: {exc}"
    return None


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_stream_and_full_call_agree_with_the_reference_for_each_impl(impl):
    why = _impl_skip_reason(impl)
    if why:
        pytest.skip(why)
    ref = make("4x4x2", impl="torch")
    c = make("4x4x2", impl=impl)
    c.load_state_dict(ref.state_dict())
    hr, lr = inputs(c, 5, 9, 8, batch=1)
    want = ref(hr, lr).tokens
    assert_close(c(hr, lr).tokens, want, torch.float32)
    stream = c.stream(1)
    parts = [stream.append(hr[:, :, :1], lr[:, :, :0]), stream.append(hr[:, :, 1:4], lr[:, :, :2]),
             stream.append(hr[:, :, 4:], lr[:, :, 2:])]
    assert_close(torch.cat([p.tokens for p in parts], 1), want, torch.float32)


# ----------------------------------------------------------------------------------------------
# the paper's compressor variants (Table 1)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", pfp.COMPRESSOR_KINDS)
def test_each_kind_reads_its_own_branches_on_the_same_token_grid(kind):
    torch.manual_seed(0)
    c = make("4x4x2", kind=kind)
    hr, lr = inputs(c, 5, 17, 16, batch=2)
    base = c(hr, lr)
    pfp_ctx = make("4x4x2")(hr, lr)
    assert base.tokens.shape == pfp_ctx.tokens.shape and torch.equal(base.positions, pfp_ctx.positions)
    assert torch.isfinite(base.tokens).all()
    with torch.no_grad():
        other_hr = c(torch.randn_like(hr), lr).tokens
        other_lr = c(hr, torch.randn_like(lr)).tokens
    assert torch.equal(other_hr, base.tokens) != c.uses_hr, kind          # HR content matters iff used
    assert torch.equal(other_lr, base.tokens) != c.uses_lr, kind          # LR content matters iff used
    # every kind trains: a loss on its tokens reaches its own parameters
    base.tokens.square().mean().backward()
    own = [p for n, p in c.named_parameters() if not n.startswith("patch_embed.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own), kind
    assert (c.patch_embed.weight.grad is not None) == c.uses_lr, kind
    assert c.config()["kind"] == kind


def test_large_patchify_is_one_causal_conv_with_the_tokens_footprint():
    c = make("4x4x2", kind="large_patchify")
    (stage,) = c.stages
    assert tuple(stage.weight.shape) == (24, 4, 2, 8, 8) and stage.stride == [2, 8, 8] and stage.activation is None
    hr, lr = inputs(c, 4, 16, 16, batch=1)
    want = torch.nn.functional.conv3d(torch.nn.functional.pad(hr, (0, 0, 0, 0, 1, 0)), stage.weight, stage.bias,
                                      stride=(2, 8, 8))                   # causal: one zero frame in front
    torch.testing.assert_close(c(hr, lr).tokens, want.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_bad_kind_and_a_checkpoint_of_another_kind(tmp_path):
    with pytest.raises(ValueError, match="compressor kind 'framepack' is not valid; choose one of: pfp, only_lr"):
        make(kind="framepack")
    make(kind="without_lr").save_checkpoint(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match='"kind": "without_lr"'):
        make(kind="large_patchify").load_checkpoint(tmp_path / "w.safetensors")
