"""The Triton conv kernels (pfp_kernels/conv/triton.py) under TRITON_INTERPRET=1.

Small shapes, fp32 and fp16 only (bf16 tl.dot operands are garbage under the interpreter; the
bf16 kernels are covered by the AOT compile test). Every output is poisoned: the kernels
allocate their outputs with torch.empty, which deterministic mode fills with NaN, so an element
a kernel fails to write shows up as a mismatch.
"""
from __future__ import annotations

import random

import pytest
import torch

import pfp_kernels
from pfp_kernels import conv
from pfp_kernels.testing import assert_close

pytest.importorskip("triton")
_WHY_NOT = conv.conv_impl_reasons("conv3d_act", torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1))["triton"]
# every output is NaN-poisoned before each test's kernels write it (conftest.py)
pytestmark = [pytest.mark.skipif(_WHY_NOT is not None, reason=f"triton cannot run on CPU here: {_WHY_NOT}"),
              pytest.mark.usefixtures("poison_uninitialised")]

if _WHY_NOT is None:
    from pfp_kernels.conv import triton as tk

CL3 = torch.channels_last_3d
# Tolerances against an fp64 reference computed from the same (rounded) inputs: fp32 accumulates
# exactly in fp32; fp16 also rounds the output (2^-11 relative).


def _weights(cout, cin, kernel, dtype, bias=True):
    fan_in = cin * kernel[0] * kernel[1] * kernel[2]
    w = (torch.randn(cout, cin, *kernel, dtype=torch.float64) / fan_in ** 0.5).to(dtype)
    b = torch.randn(cout, dtype=torch.float64).to(dtype) if bias else None
    return w, b


def _layout(x, layout):
    if layout == "cl3":
        return x.contiguous(memory_format=CL3)
    if layout == "contiguous":
        return x.contiguous()
    # non-contiguous: every other W column of a wider tensor, channels in the middle of memory
    wide = torch.cat([x, torch.zeros_like(x)], dim=4).permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    out = wide[..., ::2][..., : x.shape[4]]
    out.copy_(x)
    assert not out.is_contiguous() and not out.is_contiguous(memory_format=CL3)
    return out


def _d(t):
    return None if t is None else t.double()


def test_outputs_are_poisoned():
    # The premise of every check below: an unwritten output element is NaN, not a lucky zero.
    assert torch.isnan(torch.empty(8)).all()


# ----------------------------------------------------------------------------------------------
# conv3d_act
# ----------------------------------------------------------------------------------------------
# (B, Cin, Cout, T, H, W, kernel, stride, padding, activation, layout)
CONV_CASES = [
    (1, 3, 5, 5, 7, 6, (3, 3, 3), (1, 1, 1), (1, 1, 1), "silu", "cl3"),
    (2, 16, 8, 4, 5, 5, (3, 1, 3), (2, 1, 3), (1, 0, 1), "silu", "contiguous"),
    (1, 5, 17, 1, 1, 1, (1, 1, 1), (1, 1, 1), (0, 0, 0), None, "cl3"),
    (1, 4, 3, 6, 5, 9, (1, 3, 1), (3, 2, 1), (0, 1, 0), "silu", "noncontig"),
    (1, 2, 1, 3, 9, 4, (3, 3, 1), (1, 3, 2), (2, 1, 0), None, "cl3"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"case{i}" for i in range(len(CONV_CASES))])
def test_conv3d_matches_fp64_reference(case, dtype):
    b, cin, cout, t, h, w, kernel, stride, padding, act, layout = case
    x = _layout(torch.randn(b, cin, t, h, w).to(dtype), layout)
    weight, bias = _weights(cout, cin, kernel, dtype, bias=act is not None)
    y = pfp_kernels.conv3d_act(x, weight, bias, stride, padding, act, impl="triton")
    ref = conv.conv3d_act_reference(x.double(), weight.double(), _d(bias), list(stride), list(padding),
                                    act or "none")
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL3)
    assert_close(y, ref, dtype)


def test_every_config_is_correct(monkeypatch):
    """Force each config the picker can return; shapes cross every tile edge (M, N and K)."""
    for cls, role, cfg in tk.all_configs():
        dtype = torch.float16 if cls.startswith("16bit") else torch.float32  # 16bit, 16bit-hopper, ...
        monkeypatch.setattr(tk, "pick_config", lambda *args, _cfg=cfg: _cfg)
        # M = 2*3*5*7 = 210 > 128 rows, N = 70 > 64, K per tap = 20 (a partial 16/32 block)
        x = torch.randn(2, 20, 5, 5, 7).to(dtype).contiguous(memory_format=CL3)
        weight, bias = _weights(70, 20, (2, 1, 2), dtype)
        y = tk.conv3d_act(x, weight, bias, [2, 1, 1], [1, 0, 1], "silu")
        ref = conv.conv3d_act_reference(x.double(), weight.double(), bias.double(), [2, 1, 1], [1, 0, 1], "silu")
        assert_close(y, ref, dtype, what=f"{role} ({cls}) conv")
        prev = torch.randn(2, 20, 2, 5, 7).to(dtype)
        y = tk.causal_conv3d_act(x, prev, weight, bias, [1, 1, 1], [0, 1], "silu", -1, 6)
        ref = conv.causal_conv3d_act_reference(x.double(), prev.double(), weight.double(), bias.double(),
                                               [1, 1, 1], [0, 1], "silu", -1, 6)
        assert_close(y, ref, dtype, what=f"{role} ({cls}) causal")
        pw, pb = torch.randn(70, 20).to(dtype), torch.randn(70).to(dtype)
        res = torch.randn(2, 175, 70).to(dtype)
        y = tk.project_tokens(x, pw, pb, res)
        ref = conv.project_tokens_reference(x.double(), pw.double(), pb.double(), res.double())
        assert_close(y, ref, dtype, what=f"{role} ({cls}) project")


def test_a_batch_past_the_int32_row_index_runs_in_slices(monkeypatch):
    """More rows than one launch indexes (2**31 - 1; lowered here) run as launches over slices of
    the batch, each writing its own part of the output."""
    monkeypatch.setattr(tk, "MAX_LAUNCH_ROWS", 130)          # 120 output rows per item: one item a launch
    launches = []
    for name in ("_conv3d_act_kernel", "_project_tokens_kernel"):
        kernel = getattr(tk, name)
        monkeypatch.setattr(tk, name, type("Counted", (), {
            "__getitem__": lambda self, grid, kernel=kernel: launches.append(grid) or kernel[grid]})())
    dtype = torch.float32
    x = torch.randn(3, 4, 4, 5, 7).contiguous(memory_format=CL3)
    weight, bias = _weights(6, 4, (2, 1, 2), dtype)
    y = tk.conv3d_act(x, weight, bias, [2, 1, 1], [1, 0, 1], "silu")
    assert len(launches) == 3
    assert_close(y, conv.conv3d_act_reference(x.double(), weight.double(), bias.double(), [2, 1, 1], [1, 0, 1],
                                              "silu"), dtype)
    prev = torch.randn(3, 4, 2, 5, 7)
    y = tk.causal_conv3d_act(x, prev, weight, bias, [1, 1, 1], [0, 1], "silu", -1, 2)
    assert len(launches) == 6                                  # 2 x 5 x 8 = 80 rows per item
    assert_close(y, conv.causal_conv3d_act_reference(x.double(), prev.double(), weight.double(), bias.double(),
                                                     [1, 1, 1], [0, 1], "silu", -1, 2), dtype)
    monkeypatch.setattr(tk, "MAX_LAUNCH_ROWS", 2 * 140)      # 140 token rows per item: two items, then one
    pw, pb, res = torch.randn(6, 4), torch.randn(6), torch.randn(3, 140, 6)
    y = tk.project_tokens(x, pw, pb, res)
    assert len(launches) == 8
    assert_close(y, conv.project_tokens_reference(x.double(), pw.double(), pb.double(), res.double()), dtype)
    monkeypatch.setattr(tk, "MAX_LAUNCH_ROWS", 100)          # one item alone is too many: refused, named
    with pytest.raises(ValueError, match="one batch item has 120 rows"):
        tk.conv3d_act(x, weight, bias, [2, 1, 1], [1, 0, 1], "silu")


# ----------------------------------------------------------------------------------------------
# causal_conv3d_act
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("prev_frames,time_offset,num_out,stride", [
    (0, -2, 4, (1, 1, 1)),     # start of a stream: two zero frames before x
    (2, 0, 3, (1, 2, 1)),      # prev holds the kt-1 frames the first output needs
    (3, 1, 2, (2, 1, 2)),      # a prev frame that is no longer read (offset > 0)
    (1, -1, 2, (3, 1, 1)),     # zeros, then prev, then x in one window
])
def test_causal_two_sources_match_reference(prev_frames, time_offset, num_out, stride, dtype):
    x = torch.randn(1, 6, 4, 5, 6).to(dtype).contiguous(memory_format=CL3)
    # prev in another memory format than x: the kernel reads each through its own strides
    prev = torch.randn(1, 6, prev_frames, 5, 6).to(dtype) if prev_frames else None
    weight, bias = _weights(7, 6, (3, 3, 3), dtype)
    y = tk.causal_conv3d_act(x, prev, weight, bias, list(stride), [1, 1], "silu", time_offset, num_out)
    ref = conv.causal_conv3d_act_reference(x.double(), _d(prev), weight.double(), bias.double(), list(stride),
                                           [1, 1], "silu", time_offset, num_out)
    assert y.is_contiguous(memory_format=CL3) and y.shape == ref.shape
    assert_close(y, ref, dtype)


def _chunk_plans(total, rng):
    yield [1] * total
    yield [total]
    cuts = sorted(rng.sample(range(1, total), 2))
    yield [cuts[0], 0, cuts[1] - cuts[0], total - cuts[1]]   # includes an empty chunk
    plan, left = [], total
    while left:
        plan.append(rng.randint(1, min(3, left)))
        left -= plan[-1]
    yield plan


@pytest.mark.parametrize("kernel,stride", [((3, 1, 3), (1, 1, 1)), ((3, 3, 1), (2, 2, 1)),
                                           ((2, 1, 3), (3, 1, 1)), ((1, 3, 3), (2, 1, 1))])
def test_streaming_equals_one_call(kernel, stride):
    rng = random.Random(hash((kernel, stride)) % 1000)
    total = 7
    x = torch.randn(1, 4, total, 5, 6).contiguous(memory_format=CL3)
    weight, bias = _weights(5, 4, kernel, torch.float32)
    whole, _ = pfp_kernels.causal_conv3d_act(x, weight, bias, stride, 1, "silu", impl="triton")
    ref, _ = pfp_kernels.causal_conv3d_act(x.double(), weight.double(), bias.double(), stride, 1, "silu",
                                           impl="torch")
    assert_close(whole, ref, torch.float32)
    for plan in _chunk_plans(total, rng):
        state, outs, start = None, [], 0
        for n in plan:
            y, state = pfp_kernels.causal_conv3d_act(x[:, :, start:start + n], weight, bias, stride, 1, "silu",
                                                     state=state, impl="triton")
            outs.append(y)
            start += n
        assert_close(torch.cat(outs, dim=2), whole, kind="stream", what=f"chunk plan {plan}")


def test_causal_no_output_frames():
    x = torch.randn(2, 3, 1, 4, 4).contiguous(memory_format=CL3)
    weight, bias = _weights(5, 3, (3, 3, 3), torch.float32)
    y = tk.causal_conv3d_act(x, None, weight, bias, [2, 1, 1], [1, 1], "silu", 0, 0)
    assert y.shape == (2, 5, 0, 4, 4)


# ----------------------------------------------------------------------------------------------
# project_tokens
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,cout,layout,with_bias,with_residual", [
    ((2, 24, 3, 5, 7), 40, "cl3", True, True),
    ((1, 5, 1, 1, 1), 1, "contiguous", False, False),
    ((1, 33, 2, 3, 5), 17, "noncontig", True, False),
    ((3, 16, 2, 1, 3), 9, "contiguous", False, True),
])
def test_project_tokens_matches_fp64_reference(shape, cout, layout, with_bias, with_residual, dtype):
    b, c, t, h, w = shape
    x = _layout(torch.randn(*shape).to(dtype), layout)
    weight = (torch.randn(cout, c, dtype=torch.float64) / c ** 0.5).to(dtype)
    bias = torch.randn(cout).to(dtype) if with_bias else None
    residual = torch.randn(b, t * h * w, cout).to(dtype) if with_residual else None
    if residual is not None and layout == "noncontig":
        residual = residual.transpose(1, 2).contiguous().transpose(1, 2)
    y = pfp_kernels.project_tokens(x, weight, bias, residual, impl="triton")
    ref = conv.project_tokens_reference(x.double(), weight.double(), _d(bias), _d(residual))
    assert y.shape == (b, t * h * w, cout) and y.is_contiguous()
    assert_close(y, ref, dtype)


# ----------------------------------------------------------------------------------------------
# gradients, opcheck, bad input, config picker
# ----------------------------------------------------------------------------------------------
def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.randn_like(out)
    return torch.autograd.grad(out, [t for t in leaves if t is not None], g)


def _seeded_grads(fn, inputs):
    torch.manual_seed(1)
    return _grads(fn, inputs)


def test_gradients_match_reference():
    x = torch.randn(1, 3, 4, 5, 5).contiguous(memory_format=CL3)
    w, b = _weights(4, 3, (3, 3, 3), torch.float32)
    for stride in ((1, 1, 1), (2, 2, 1)):
        def conv_fn(impl):
            return lambda x_, w_, b_: pfp_kernels.conv3d_act(x_, w_, b_, stride, 1, "silu", impl=impl)
        for got, want in zip(_seeded_grads(conv_fn("triton"), [x, w, b]), _seeded_grads(conv_fn("torch"), [x, w, b])):
            assert_close(got, want, kind="grad")

    # causal, with a prev (state frames) that needs a gradient too
    prev = torch.randn(1, 3, 2, 5, 5)

    def causal_fn(op):
        return lambda x_, p_, w_, b_: op(x_, p_, w_, b_, [1, 1, 1], [1, 1], "silu", 0, 4)
    for got, want in zip(_seeded_grads(causal_fn(torch.ops.pfp.causal_conv3d_act_triton), [x, prev, w, b]),
                         _seeded_grads(causal_fn(conv.causal_conv3d_act_reference), [x, prev, w, b])):
        assert_close(got, want, kind="grad")

    pw, pb, res = torch.randn(6, 3), torch.randn(6), torch.randn(1, 100, 6)

    def proj_fn(impl):
        return lambda h_, w_, b_, r_: pfp_kernels.project_tokens(h_, w_, b_, r_, impl=impl)
    for got, want in zip(_seeded_grads(proj_fn("triton"), [x, pw, pb, res]),
                         _seeded_grads(proj_fn("torch"), [x, pw, pb, res])):
        assert_close(got, want, kind="grad")


def test_opcheck_triton_ops():
    x = torch.randn(1, 3, 3, 4, 4).contiguous(memory_format=CL3).requires_grad_(True)
    w = (torch.randn(4, 3, 2, 3, 1) * 0.2).requires_grad_(True)
    b = torch.randn(4).requires_grad_(True)
    torch.library.opcheck(torch.ops.pfp.conv3d_act_triton.default, (x, w, b, [1, 2, 1], [1, 1, 0], "silu"))
    prev = torch.randn(1, 3, 2, 4, 4).requires_grad_(True)
    torch.library.opcheck(torch.ops.pfp.causal_conv3d_act_triton.default,
                          (x, prev, w, None, [2, 1, 1], [1, 0], "none", -1, 2))
    pw, res = torch.randn(5, 3).requires_grad_(True), torch.randn(1, 48, 5).requires_grad_(True)
    torch.library.opcheck(torch.ops.pfp.project_tokens_triton.default, (x, pw, None, res))


def test_output_strides_match_fake_for_size_one_dims():
    # Cout = 1 and T=H=W=1 outputs: a contiguous tensor already counts as channels-last-3d there,
    # and the fake kernel keeps contiguous strides; the real kernel must return the same.
    x = torch.randn(2, 3, 1, 1, 1)
    for cout in (1, 4):
        w = torch.randn(cout, 3, 1, 1, 1)
        y = tk.conv3d_act(x, w, None, [1, 1, 1], [0, 0, 0], "none")
        assert y.stride() == conv.autograd._conv3d_act_fake(x, w, None, [1, 1, 1], [0, 0, 0], "none").stride()
        torch.testing.assert_close(y, conv.conv3d_act_reference(x, w, None, [1, 1, 1], [0, 0, 0], "none"))


def test_bad_input():
    x = torch.randn(1, 2, 3, 3, 3)
    w = torch.randn(2, 2, 1, 1, 1)
    with pytest.raises(ValueError, match="activation"):
        tk.conv3d_act(x, w, None, [1, 1, 1], [0, 0, 0], "relu")
    with pytest.raises(ValueError, match="dtype"):
        tk.conv3d_act(x.int(), w.int(), None, [1, 1, 1], [0, 0, 0], "none")
    with pytest.raises(ValueError, match="prev"):
        tk.causal_conv3d_act(x, torch.randn(1, 3, 1, 3, 3), w, None, [1, 1, 1], [0, 0], "none", 0, 3)
    with pytest.raises(ValueError, match="num_out"):
        tk.causal_conv3d_act(x, None, w, None, [1, 1, 1], [0, 0], "none", 0, -1)


def test_picker_returns_table_entries_and_compressor_roles():
    table = {cfg for _, _, cfg in tk.all_configs()}
    cpu = torch.device("cpu")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for cin in (1, 3, 16, 17, 32, 33, 64, 512):
            for cout in (1, 16, 64, 65, 128, 512, 5120):
                for m in (1, 100, 6240, 23400, 374400):
                    assert tk.pick_config(cin, cout, m, dtype, cpu) in table
    roles = tk.CONV_CONFIGS["16bit"]
    # full-scale compressor stages (HR latent 120x60x104) on an H100's 132 SMs
    assert tk.pick_config(16, 64, 60 * 60 * 104, torch.bfloat16, cpu) == roles["narrow"]
    assert tk.pick_config(64, 128, 60 * 30 * 52, torch.bfloat16, cpu) == roles["wide"]
    assert tk.pick_config(128, 256, 60 * 15 * 26, torch.bfloat16, cpu) == roles["wide"]
    assert tk.pick_config(256, 512, 60 * 8 * 13, torch.bfloat16, cpu) == roles["wide_small_m"]


def test_picker_uses_the_hopper_table_on_sm90_only(monkeypatch):
    cpu = torch.device("cpu")
    hopper, portable = tk.CONV_CONFIGS["16bit_hopper"], tk.CONV_CONFIGS["16bit"]
    for cap, roles in ((90, hopper), (89, portable), (80, portable)):
        monkeypatch.setattr(tk, "_capability", lambda device, cap=cap: cap)
        assert tk.pick_config(16, 64, 60 * 60 * 104, torch.bfloat16, cpu) == roles["narrow"]
        assert tk.pick_config(64, 128, 60 * 30 * 52, torch.float16, cpu) == roles["wide"]
        assert tk.pick_config(256, 512, 60 * 8 * 13, torch.bfloat16, cpu) == roles["wide_small_m"]
        assert tk.pick_config(64, 128, 60 * 30 * 52, torch.float32, cpu) == tk.CONV_CONFIGS["fp32"]["all"]
