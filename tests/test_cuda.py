"""Every op on a real GPU: the Triton kernels compiled for the card (bf16 included, which the
interpreter cannot check), the SDPA and optional flash-attn / xformers backends, and the pfp
layer's CUDA paths (compressor streaming, a bf16-autocast training step, generation).

Skipped without CUDA, with the reason. Each result is compared with the plain-PyTorch reference
computed in fp64 on the CPU from the same rounded inputs, by the relative error
||out - ref|| / ||ref|| and the largest elementwise error. Outputs are poisoned: deterministic
mode NaN-fills every torch.empty on the GPU too, so an element a kernel skips shows up as NaN.
"""
from __future__ import annotations

import random

import pytest
import torch

import pfp_kernels as pk
from pfp_kernels import _registry, conv
from pfp_kernels.testing import assert_close
from pfp_kernels.attention import joint_attention_reference

from attention_cases import SHAPES as CPU_ATTN_SHAPES
from conv_cases import check_project_tokens, make_activation, poisoned_outputs

_WHY_NOT = None
if not torch.cuda.is_available():
    _WHY_NOT = "no CUDA device (torch.cuda.is_available() is False)"
elif _registry.TRITON_INTERPRET:
    _WHY_NOT = "TRITON_INTERPRET is set: the Triton kernels would run in the interpreter, not on the GPU"
elif not _registry.TRITON_AVAILABLE:
    _WHY_NOT = "triton is not importable"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))]


@pytest.fixture(autouse=True)
def _poisoned():
    """NaN-filled torch.empty on the GPU. conv_cases.poisoned_outputs is warn_only: some CUDA ops
    the training and generation tests reach (SDPA's backward, scatter/index ops) have no
    deterministic kernel, and here only the poison is wanted, not bit-reproducibility."""
    with poisoned_outputs():
        yield


DEV = "cuda"
CL3 = torch.channels_last_3d
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
# ||err|| / ||ref||: fp32 dots run as TF32 on the tensor cores (10-bit mantissa operands); fp16
# and bf16 round the operands and the output (2^-11, 2^-8 relative).
REL = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# The largest error goes through pfp_kernels.testing's one rule, at a stated multiple of its
# forward tolerance (TF32 makes fp32 the loosest): max error <= 1e-2 (fp32, fp16) / 5e-2 (bf16)
# of max(1, max|ref|).
GPU_FACTOR = {torch.float32: 500.0, torch.float16: 2.5, torch.bfloat16: 5 / 3}


def _check(got: torch.Tensor, want: torch.Tensor, dtype, what: str, scale: float = 1.0):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert not torch.isnan(got).any(), f"{what}: NaN (an element was not written)"
    if not want.numel():
        return
    rel = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert rel <= scale * REL[dtype], f"{what}: relative error {rel:.3g} > {scale * REL[dtype]:.3g}"
    assert_close(got, want, dtype, factor=scale * GPU_FACTOR[dtype], what=what)


def _cpu64(t):
    return None if t is None else t.detach().double().cpu()


def _weights(cout, cin, kernel, dtype, bias=True):
    fan_in = cin * kernel[0] * kernel[1] * kernel[2]
    w = (torch.randn(cout, cin, *kernel, dtype=torch.float64) / fan_in ** 0.5).to(DEV, dtype)
    b = (0.1 * torch.randn(cout, dtype=torch.float64)).to(DEV, dtype) if bias else None
    return w, b


def test_outputs_are_poisoned():
    assert torch.isnan(torch.empty(64, device=DEV)).all()


# ----------------------------------------------------------------------------------------------
# conv3d_act, causal_conv3d_act, project_tokens
# ----------------------------------------------------------------------------------------------
# (B, Cin, Cout, T, H, W, kernel, stride, padding, activation, layout): odd sizes, size 1, and the
# four compressor stages at a reduced frame count (the channel widths pick the real tile configs).
CONV_CASES = [
    (1, 3, 5, 5, 7, 6, (3, 3, 3), (1, 1, 1), (1, 1, 1), "silu", "channels_last"),
    (2, 16, 8, 4, 5, 5, (3, 1, 3), (2, 1, 3), (1, 0, 1), "silu", "contiguous"),
    (1, 5, 17, 1, 1, 1, (1, 1, 1), (1, 1, 1), (0, 0, 0), None, "channels_last"),
    (1, 4, 3, 6, 5, 9, (1, 3, 1), (3, 2, 1), (0, 1, 0), "silu", "strided"),
    (1, 16, 64, 8, 30, 52, (3, 3, 3), (2, 1, 1), (1, 1, 1), "silu", "channels_last"),
    (1, 64, 128, 4, 30, 52, (3, 3, 3), (1, 2, 2), (1, 1, 1), "silu", "channels_last"),
    (1, 128, 256, 3, 15, 26, (3, 3, 3), (1, 2, 2), (1, 1, 1), "silu", "channels_last"),
    (2, 256, 512, 2, 15, 26, (3, 3, 3), (1, 2, 2), (1, 1, 1), "silu", "channels_last"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"case{i}" for i in range(len(CONV_CASES))])
def test_conv3d_act_matches_fp64_reference(case, dtype):
    b, cin, cout, t, h, w, kernel, stride, padding, act, layout = case
    x = make_activation((b, cin, t, h, w), dtype, layout, device=DEV)
    weight, bias = _weights(cout, cin, kernel, dtype)
    for impl in ("triton", "auto"):
        y = pk.conv3d_act(x, weight, bias, stride, padding, act, impl=impl)
        ref = conv.conv3d_act_reference(_cpu64(x), _cpu64(weight), _cpu64(bias), list(stride), list(padding),
                                        act or "none")
        assert y.dtype == dtype and y.device.type == "cuda" and y.is_contiguous(memory_format=CL3)
        _check(y, ref, dtype, f"conv3d_act {impl}")
        if impl == "triton" and dtype == torch.float32:
            # the Triton conv's fp32 dots are IEEE (~1e-6 relative), not TF32 (~5e-4): REL's TF32
            # allowance would hide a switch to TF32, this bound does not
            rel = ((y.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            assert rel <= 1e-4, f"conv3d_act triton fp32: relative error {rel:.3g} > 1e-4 (TF32 dots?)"


def test_auto_picks_triton_on_cuda():
    x = torch.zeros(1, 16, 2, 4, 4, device=DEV, dtype=torch.bfloat16)
    w = torch.zeros(32, 16, 3, 3, 3, device=DEV, dtype=torch.bfloat16)
    reasons = conv.conv_impl_reasons("conv3d_act", x, w)
    assert reasons["triton"] is None, reasons
    assert conv.CONV3D_ACT.choose("auto", x, w) == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("kernel,stride", [((3, 3, 3), (2, 1, 1)), ((3, 1, 3), (1, 2, 1)), ((2, 3, 3), (3, 1, 2))])
def test_causal_streaming_equals_reference(kernel, stride, dtype):
    rng = random.Random(hash((kernel, stride)) % 1000)
    total = 9
    x = torch.randn(1, 16, total, 7, 10, device=DEV).to(dtype).contiguous(memory_format=CL3)
    weight, bias = _weights(32, 16, kernel, dtype)
    whole, _ = pk.causal_conv3d_act(x, weight, bias, stride, 1, "silu", impl="triton")
    ref, _ = pk.causal_conv3d_act(_cpu64(x), _cpu64(weight), _cpu64(bias), stride, 1, "silu", impl="torch")
    _check(whole, ref, dtype, "causal whole")
    for plan in ([1] * total, [4, 0, 2, 3], [rng.randint(2, 7)]):
        plan = plan + [total - sum(plan)] if sum(plan) < total else plan
        state, outs, start = None, [], 0
        for n in plan:
            y, state = pk.causal_conv3d_act(x[:, :, start:start + n], weight, bias, stride, 1, "silu",
                                            state=state, impl="triton")
            outs.append(y)
            start += n
        _check(torch.cat(outs, dim=2), ref, dtype, f"causal chunks {plan}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape,cout,layout,with_bias,with_residual", [
    ((2, 24, 3, 5, 7), 40, "channels_last", True, True),
    ((1, 5, 1, 1, 1), 1, "contiguous", False, False),
    ((1, 33, 2, 3, 5), 17, "strided", True, False),
    ((1, 512, 4, 7, 13), 3072, "channels_last", True, True),
])
def test_project_tokens_matches_fp64_reference(shape, cout, layout, with_bias, with_residual, dtype):
    check_project_tokens("triton", dtype, shape, cout, with_bias, with_residual, layout, device=DEV, compare=_check)


def _grads(fn, leaves, grad_out):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    return torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.to(out.device, out.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_conv_gradients_match_fp64_reference(dtype):
    x = torch.randn(1, 16, 5, 9, 10, device=DEV).to(dtype).contiguous(memory_format=CL3)
    w, b = _weights(24, 16, (3, 3, 3), dtype)
    stride = (2, 2, 1)
    go = torch.randn(1, 24, 3, 5, 10, dtype=torch.float64)
    got = _grads(lambda x_, w_, b_: pk.conv3d_act(x_, w_, b_, stride, 1, impl="triton"), [x, w, b], go)
    want = _grads(lambda x_, w_, b_: conv.conv3d_act_reference(x_, w_, b_, list(stride), [1, 1, 1], "silu"),
                  [_cpu64(x), _cpu64(w), _cpu64(b)], go)
    for name, g, r in zip(("x", "weight", "bias"), got, want):
        _check(g, r, dtype, f"conv3d_act d{name}", scale=2.0)

    prev = torch.randn(1, 16, 2, 9, 10, device=DEV).to(dtype)
    go = torch.randn(1, 24, 4, 9, 10, dtype=torch.float64)

    def causal(op):
        return lambda x_, p_, w_, b_: op(x_, p_, w_, b_, [1, 1, 1], [1, 1], "silu", 0, 4)
    got = _grads(causal(torch.ops.pfp.causal_conv3d_act_triton), [x, prev, w, b], go)
    want = _grads(causal(conv.causal_conv3d_act_reference), [_cpu64(x), _cpu64(prev), _cpu64(w), _cpu64(b)], go)
    for name, g, r in zip(("x", "prev", "weight", "bias"), got, want):
        _check(g, r, dtype, f"causal_conv3d_act d{name}", scale=2.0)


def test_opcheck_conv_ops():
    x = torch.randn(1, 3, 3, 4, 4, device=DEV).contiguous(memory_format=CL3).requires_grad_(True)
    w = (torch.randn(4, 3, 2, 3, 1, device=DEV) * 0.2).requires_grad_(True)
    b = torch.randn(4, device=DEV).requires_grad_(True)
    torch.library.opcheck(torch.ops.pfp.conv3d_act_triton.default, (x, w, b, [1, 2, 1], [1, 1, 0], "silu"))
    prev = torch.randn(1, 3, 2, 4, 4, device=DEV).requires_grad_(True)
    torch.library.opcheck(torch.ops.pfp.causal_conv3d_act_triton.default,
                          (x, prev, w, None, [2, 1, 1], [1, 0], "none", -1, 2))
    pw = torch.randn(5, 3, device=DEV).requires_grad_(True)
    res = torch.randn(1, 48, 5, device=DEV).requires_grad_(True)
    torch.library.opcheck(torch.ops.pfp.project_tokens_triton.default, (x, pw, None, res))


# ----------------------------------------------------------------------------------------------
# joint_attention
# ----------------------------------------------------------------------------------------------
# (B, Nq, Nk, Nc, H, D, context batch): the CPU tests' shapes, plus D = 128 and lengths past
# many blocks.
ATTN_SHAPES = CPU_ATTN_SHAPES + [(1, 333, 333, 777, 3, 128, 1), (2, 1000, 517, 1500, 2, 64, None)]


def _attn_inputs(shape, dtype, requires_grad=False):
    b, nq, nk, nc, h, d, cb = shape

    def r(*s):
        return torch.randn(*s, device=DEV).to(dtype).requires_grad_(requires_grad)
    q, k, v = r(b, nq, h, d), r(b, nk, h, d), r(b, nk, h, d)
    if nc is None:
        return q, k, v, None, None
    cb = b if cb is None else cb
    return q, k, v, r(cb, nc, h, d), r(cb, nc, h, d)


def _cuda_backends(inputs):
    reasons = pk.attention_backends(*inputs)
    return [n for n, why in reasons.items() if why is None and n != "torch"], reasons


def test_triton_and_sdpa_run_here():
    q = torch.zeros(1, 4, 2, 64, device=DEV, dtype=torch.bfloat16)
    ok, reasons = _cuda_backends((q, q, q, q, q))
    assert "triton" in ok and "sdpa" in ok, reasons


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_fp64_reference(shape, dtype):
    inputs = _attn_inputs(shape, dtype)
    want, want_lse = joint_attention_reference(*[_cpu64(t) for t in inputs], scale=0.3)
    ok, _ = _cuda_backends(inputs)
    for impl in ok + ["auto"]:
        out, lse = pk.joint_attention(*inputs, scale=0.3, impl=impl, return_lse=True)
        assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
        _check(out, want, dtype, f"{impl} out")
        _check(lse, want_lse, torch.float32, f"{impl} lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(2, 13, 7, 19, 2, 16, 1), (1, 1, 4, 0, 1, 32, None), (2, 5, 3, None, 1, 16, None),
                                   (1, 200, 150, 333, 2, 128, 1), (2, 130, 70, 90, 3, 64, None)],
                         ids=lambda s: "x".join(map(str, s)))
def test_attention_gradients_match_fp64_reference(shape, dtype):
    """q, k, v, context_k, context_v gradients through a loss on both out and lse."""
    inputs = _attn_inputs(shape, dtype)
    ok, _ = _cuda_backends(inputs)
    ref_in = [None if t is None else _cpu64(t).requires_grad_() for t in inputs]
    out, lse = joint_attention_reference(*ref_in, scale=0.25)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), [t for t in ref_in if t is not None])
    for impl in ok:
        ins = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
        o, lse_ = pk.joint_attention(*ins, scale=0.25, impl=impl, return_lse=True)
        loss = (o.double() * go.to(DEV)).sum() + (lse_.double() * gl.to(DEV)).sum()
        got = torch.autograd.grad(loss, [t for t in ins if t is not None])
        for name, g, w in zip(("q", "k", "v", "context_k", "context_v"), got, want):
            _check(g, w, dtype, f"{impl} d{name}", scale=2.0)


def test_sdpa_backend_takes_cudnn_on_hopper():
    # the fast per-segment path (benchmarks/results/sweeps/cuda_sweep_*.md) must not fall back silently
    from pfp_kernels.attention.backends import _cudnn_segment
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("measured and checked on sm_90 (H100/H200) only")
    q = torch.randn(2, 3, 77, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 3, 130, 128, device=DEV, dtype=torch.bfloat16)
    res = _cudnn_segment(q, k, k, 0.1)
    assert res is not None, "cuDNN attention was not taken"
    want, want_lse = joint_attention_reference(_cpu64(q.transpose(1, 2)), _cpu64(k.transpose(1, 2)),
                                               _cpu64(k.transpose(1, 2)), scale=0.1)
    _check(res[0].transpose(1, 2), want, torch.bfloat16, "cudnn out")
    _check(res[1], want_lse, torch.float32, "cudnn lse")


def test_opcheck_attention_ops():
    q, k, v, ck, cv = _attn_inputs((2, 5, 3, 4, 2, 16, 1), torch.float32, requires_grad=True)
    for op in ("joint_attention_triton", "joint_attention_sdpa"):
        torch.library.opcheck(getattr(torch.ops.pfp, op), (q, k, v, ck, cv, 0.25))
    out, lse = torch.ops.pfp.joint_attention_triton(q, k, v, ck, cv, 0.25)
    args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, ck, cv, out, lse, 0.25)
    torch.library.opcheck(torch.ops.pfp.joint_attention_triton_backward, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_inductor_fullgraph():
    """conv3d_act and joint_attention inside one compiled function, forward and backward."""
    x = torch.randn(1, 8, 4, 6, 6, device=DEV).contiguous(memory_format=CL3)
    w, b = _weights(32, 8, (3, 3, 3), torch.float32)
    ck = torch.randn(1, 20, 2, 16, device=DEV)

    def f(x, w, b, ck):
        y = pk.conv3d_act(x, w, b, 1, 1)
        tokens = y.flatten(2).transpose(1, 2).reshape(1, -1, 2, 16)
        return pk.joint_attention(tokens, tokens, tokens, ck, ck)

    compiled = torch.compile(f, fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, ck)]
    out = compiled(*leaves)
    eager_leaves = [t.clone().requires_grad_(True) for t in (x, w, b, ck)]
    want = f(*eager_leaves)
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
    g = torch.randn_like(out)
    for got_g, want_g in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, eager_leaves, g)):
        torch.testing.assert_close(got_g, want_g, rtol=5e-3, atol=5e-3)


# ----------------------------------------------------------------------------------------------
# the pfp layer on CUDA
# ----------------------------------------------------------------------------------------------
def test_compressor_stream_on_cuda_matches_the_cpu_reference():
    from torch import nn

    import pfp
    torch.manual_seed(0)
    pe = nn.Conv3d(4, 48, (1, 2, 2), (1, 2, 2))
    # zero_init=False: the high-res branch's projection starts at zero otherwise, hiding the convs
    ref = pfp.MemoryCompressor(pe, 4, 48, "4x4x2", (16, 32, 64, 64), impl="torch", zero_init=False).double()
    hr = torch.randn(1, 4, 9, 32, 48, dtype=torch.float64)
    lr = torch.randn(*ref.expected_lr_shape(hr.shape), dtype=torch.float64)
    want = ref(hr, lr).tokens
    for dtype in DTYPES:
        c = pfp.MemoryCompressor(nn.Conv3d(4, 48, (1, 2, 2), (1, 2, 2)), 4, 48, "4x4x2", (16, 32, 64, 64),
                                 zero_init=False)
        c.load_state_dict(ref.state_dict())
        c = c.to(DEV, dtype)
        h, lo = hr.to(DEV, dtype), lr.to(DEV, dtype)
        _check(c(h, lo).tokens, want, dtype, f"compressor {dtype}", scale=2.0)
        stream = c.stream(1)
        parts = [stream.append(h[:, :, :1], lo[:, :, :0]), stream.append(h[:, :, 1:6], lo[:, :, :3]),
                 stream.append(h[:, :, 6:], lo[:, :, 3:])]
        _check(torch.cat([p.tokens for p in parts], 1), want, dtype, f"compressor stream {dtype}", scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compressor_stream_cuda_graph_replays_equal_the_plain_stream(dtype):
    """CompressorStream(cuda_graph=True): chunks 0-2 run as usual (the stream's start, then the
    first chunk at each of the two phases the stages pass through), 3-7 replay a captured CUDA
    graph; its tokens and states equal the plain stream's on the same kernels (bitwise), and a
    replaced parameter makes it capture again instead of reading the old weight."""
    from torch import nn

    import pfp
    torch.manual_seed(0)
    c = pfp.MemoryCompressor(nn.Conv3d(4, 48, (1, 2, 2), (1, 2, 2)), 4, 48, "4x4x2", (16, 32, 64, 64),
                             zero_init=False).to(DEV, dtype).eval()
    hr = torch.randn(1, 4, 16, 32, 48, device=DEV, dtype=dtype)
    lr = torch.randn(*c.expected_lr_shape(hr.shape), device=DEV, dtype=dtype)
    with torch.no_grad():
        for swap in (False, True):
            plain, graphed = c.stream(1), c.stream(1, cuda_graph=True)
            for k in range(8):
                if swap and k == 5:
                    c.proj.weight = nn.Parameter(c.proj.weight * -1)
                hc, lc = hr[:, :, 2 * k:2 * k + 2], lr[:, :, k:k + 1]
                want, got = plain.append(hc, lc), graphed.append(hc, lc)
                assert torch.equal(got.tokens, want.tokens), (swap, k)
                for a, b in zip(graphed._states, plain._states):
                    assert a.frames_seen == b.frames_seen and torch.equal(a.frames, b.frames)
            # every recorded step replayed a graph (a failed capture would run them plainly, warned)
            assert graphed._graph_error is None, graphed._graph_error
            assert graphed.replayed_appends == graphed.graph_replays == 5


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_bf16_autocast_training_step_on_cuda_lowers_the_loss(mode):
    from _tiny_pfp import fixed_batch_losses
    losses = fixed_batch_losses(mode, DEV, torch.bfloat16)
    assert losses[-1] < 0.8 * losses[0], losses


def test_generate_on_cuda_runs_the_builtin_model():
    from pfp.generate import generate
    from pfp.text import Storyboard
    from pfp.weights import load_weights
    model = load_weights()
    story = Storyboard.from_list([{"start": 0, "end": 2, "prompt": "a red circle on a blue background"}])
    res = generate(model, story, 1.0, steps=4, device=DEV, progress=False)
    assert res.video.is_floating_point() and torch.isfinite(res.video).all()
    assert res.video.shape[0] == 3 and res.video.std() > 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 130, 70, 333, 2, 128, 1), (2, 65, 0, 200, 1, 64, None)],
                         ids=lambda s: "x".join(map(str, s)))
def test_attention_with_a_context_mask_matches_fp64_reference(shape, dtype):
    """The Triton kernels' masked variants (and every other backend that takes a mask) on the card:
    a fully masked sample (with Nk=0 it gets out 0, lse -inf), a sample masked over its first
    blocks, forward and gradients (no gradient through the lse)."""
    inputs = _attn_inputs(shape, dtype)
    b, nc = inputs[0].shape[0], inputs[3].shape[1]
    mask = torch.rand(b, nc, generator=torch.Generator().manual_seed(5)) > 0.4
    mask[1] = False
    mask[0, :150] = False
    mask = mask.to(DEV)
    reasons = pk.attention_backends(*inputs, mask)
    assert reasons["triton"] is None and reasons["sdpa_concat"] is None, reasons
    ref_in = [_cpu64(t).requires_grad_() for t in inputs]
    want, want_lse = joint_attention_reference(*ref_in, 0.25, mask.cpu())
    go = torch.randn_like(want)
    want_g = torch.autograd.grad((want * go).sum(), ref_in)
    # with a mask off the CPU, the lse comes from Triton (auto's choice then) or the reference only
    for impl, with_lse in (("triton", False), ("triton", True), ("auto", True), ("sdpa_concat", False)):
        ins = [t.detach().clone().requires_grad_() for t in inputs]
        out = pk.joint_attention(*ins, context_mask=mask, scale=0.25, impl=impl, return_lse=with_lse)
        out = out[0] if with_lse else out
        _check(out, want, dtype, f"{impl} masked out")
        got = torch.autograd.grad((out.double() * go.to(DEV)).sum(), ins)
        for name, g, w in zip(("q", "k", "v", "context_k", "context_v"), got, want_g):
            _check(g, w, dtype, f"{impl} masked d{name}", scale=2.0)
    _, lse = pk.joint_attention(*inputs, context_mask=mask, scale=0.25, impl="triton", return_lse=True)
    assert torch.equal(torch.isfinite(lse.cpu()), torch.isfinite(want_lse))
    with pytest.raises(ValueError, match="returns no lse with a context_mask"):
        pk.joint_attention(*inputs, context_mask=mask, scale=0.25, impl="sdpa_concat", return_lse=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [s for s in ATTN_SHAPES if s[3] is not None and s[3] + s[2] > 0],
                         ids=lambda s: "x".join(map(str, s)))
def test_joint_kv_buffer_matches_fp64_reference(shape, dtype):
    """JointKVBuffer on the card: flash-attn's kernel (where installed) and SDPA over the buffer,
    two steps of one loop, and with a key mask (a fully masked sample reads the targets alone)."""
    q, k, v, ck, cv = _attn_inputs(shape, dtype)
    b, nc = q.shape[0], ck.shape[1]
    buf = pk.JointKVBuffer(ck, cv, b, k.shape[1])
    impls = [n for n, why in buf.backends(q).items() if why is None]
    assert "sdpa" in impls, buf.backends(q)
    with torch.no_grad():
        for step in range(2):
            q2, k2, v2 = (t * (1 + step) for t in (q, k, v))
            want = joint_attention_reference(*[_cpu64(t) for t in (q2, k2, v2, ck, cv)], scale=0.3)[0]
            for impl in impls + ["auto"]:
                _check(buf.attend(q2, k2, v2, scale=0.3, impl=impl), want, dtype, f"buffer {impl} step {step}")
        if nc and k.shape[1]:
            mask = torch.rand(ck.shape[0], nc, generator=torch.Generator().manual_seed(3)) > 0.4
            mask[-1] = False
            mask = mask.to(DEV)
            masked = pk.JointKVBuffer(ck, cv, b, k.shape[1], context_mask=mask)
            want = joint_attention_reference(*[_cpu64(t) for t in (q, k, v, ck, cv)], 0.3, mask.cpu())[0]
            _check(masked.attend(q, k, v, scale=0.3), want, dtype, "buffer masked")
            # a tail key mask too (HunyuanVideo's padded text after the target): the tail joins the
            # reference's context segment, under the joined mask
            tail = torch.ones(b, k.shape[1], dtype=torch.bool, device=DEV)
            tail[0, k.shape[1] // 2:] = False
            keep = torch.cat([mask.expand(b, -1), tail], 1).cpu()
            e = _cpu64(q)[:, :0]
            joined = [torch.cat([_cpu64(c).expand(b, -1, -1, -1), _cpu64(t)], 1) for c, t in ((ck, k), (cv, v))]
            want = joint_attention_reference(_cpu64(q), e, e, *joined, 0.3, keep)[0]
            _check(masked.attend(q, k, v, key_mask=tail, scale=0.3), want, dtype, "buffer tail-masked")
