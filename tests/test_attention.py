"""joint_attention / merge_attention: every backend that runs here against an fp64 reference.

Outputs are poisoned: deterministic mode with fill_uninitialized_memory NaN-fills every
torch.empty, so an element a kernel forgot to write shows up as NaN.
"""
import math

import pytest
import torch

import pfp_kernels as pk
from pfp_kernels import _extension, _registry
from pfp_kernels.attention import joint_attention_reference
from pfp_kernels.testing import assert_close

from attention_cases import SHAPES



# every output is NaN-poisoned before each test's kernels write it (conftest.py)
pytestmark = pytest.mark.usefixtures("poison_uninitialised")


def _inputs(b, nq, nk, nc, h, d, dtype, ctx_batch=None, requires_grad=False):
    def r(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)
    q, k, v = r(b, nq, h, d), r(b, nk, h, d), r(b, nk, h, d)
    if nc is None:
        return q, k, v, None, None
    cb = b if ctx_batch is None else ctx_batch
    return q, k, v, r(cb, nc, h, d), r(cb, nc, h, d)


def _ref64(q, k, v, ck, cv, scale=None):
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return joint_attention_reference(d(q), d(k), d(v), d(ck), d(cv), scale)


def _backends_here(dtype):
    q = torch.zeros(1, 1, 1, 16, dtype=dtype)
    return [n for n, why in pk.attention_backends(q, q, q, q, q).items() if why is None]


def _lse_close(lse, want, dtype, what):
    # lse is fp32 for every input dtype; reduced-precision inputs shift it by their rounding.
    assert_close(lse, want, torch.float32, factor=1.0 if dtype == torch.float32 else 5.0, what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_fp64_reference(shape, dtype):
    b, nq, nk, nc, h, d, cb = shape
    q, k, v, ck, cv = _inputs(b, nq, nk, nc, h, d, dtype, cb)
    want, want_lse = _ref64(q, k, v, ck, cv, scale=0.3)
    for impl in _backends_here(dtype):
        if impl == "triton" and nq * (nk + (nc or 0)) > 2500:
            continue  # the interpreter is slow; the other shapes cover the same paths
        out, lse = pk.joint_attention(q, k, v, ck, cv, scale=0.3, impl=impl, return_lse=True)
        assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
        assert lse.shape == (b, h, nq) and lse.dtype == torch.float32
        assert_close(out, want, dtype, what=f"{impl} out")
        _lse_close(lse, want_lse, dtype, f"{impl} lse")


def test_default_scale_and_return_type():
    q, k, v, ck, cv = _inputs(1, 4, 6, 3, 2, 16, torch.float32)
    out = pk.joint_attention(q, k, v, ck, cv)
    assert isinstance(out, torch.Tensor)
    assert_close(out, _ref64(q, k, v, ck, cv, scale=1 / math.sqrt(16))[0], torch.float32, what="default scale")


def test_broadcast_context_is_not_copied_and_matches_per_batch():
    q, k, v, ck, cv = _inputs(3, 5, 4, 6, 2, 16, torch.float32, ctx_batch=1)
    out = pk.joint_attention(q, k, v, ck, cv, impl="auto")
    for i in range(3):
        one = pk.joint_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], ck, cv, impl="torch")
        assert_close(out[i:i + 1], one, torch.float32, what=f"batch {i}")


def test_every_backend_reads_strided_inputs():
    """Views as models produce them: [B, H, N, D] transposed, a head-dim slice with stride 2 along D
    (ATen's CPU flash kernel assumes a unit stride there), a context sliced out of a longer history."""
    b, nq, nk, nc, h, d = 2, 9, 7, 11, 3, 16
    q = torch.randn(b, h, nq, d).transpose(1, 2)
    k = torch.randn(b, nk, h, 2 * d)[..., ::2]
    v = torch.randn(b, nk, h, d + 8)[..., 8:]
    ck = torch.randn(1, nc + 4, h, 2 * d)[:, 4:, :, ::2]
    cv = torch.randn(1, h, nc, d).transpose(1, 2)
    want, want_lse = _ref64(q, k, v, ck, cv, scale=0.3)
    for impl in _backends_here(torch.float32):
        out, lse = pk.joint_attention(q, k, v, ck, cv, scale=0.3, impl=impl, return_lse=True)
        assert_close(out, want, torch.float32, what=f"{impl} out")
        _lse_close(lse, want_lse, torch.float32, f"{impl} lse")


def test_empty_queries():
    q, k, v, ck, cv = _inputs(2, 0, 3, 4, 2, 16, torch.float32)
    for impl in _backends_here(torch.float32):
        out, lse = pk.joint_attention(q, k, v, ck, cv, impl=impl, return_lse=True)
        assert out.shape == (2, 0, 2, 16) and lse.shape == (2, 2, 0)


# ----------------------------------------------------------------------------------------------
# the C++ CPU kernel, each route forced: "flash" (our two-segment kernel, blocks of 128 queries x
# 256 keys, query chunks of up to 64K/D), "segments" (ATen's flash kernel per segment + merge) and
# "concat" (ATen's flash kernel over the concatenation)
# ----------------------------------------------------------------------------------------------
CPP_ROUTES = ["flash", "segments", "concat"]
# Past one block in every direction and not a multiple of it: Nq 300 (one chunk = 2 x 128 + 44),
# a key block straddling the context/target boundary (Nc 300 in [256, 512)), Nc = 0, Nk = 0 with a
# long context, D 256 (two chunks of 150 queries), a single key, head dims not a multiple of the
# 8-float vector (20, 1), many heads.
CPP_SHAPES = SHAPES + [
    (2, 300, 211, 300, 2, 64, 1),
    (1, 70, 33, 290, 3, 20, None),
    (2, 65, 0, 513, 1, 32, 1),
    (1, 129, 600, 0, 2, 16, None),
    (1, 300, 20, 270, 4, 256, 1),
    (1, 3, 1, None, 1, 1, None),
    (1, 40, 5, 7, 9, 8, 1),
]


@pytest.fixture
def cpp_route(request):
    if not _extension.has_cpu_kernel("joint_attention"):
        pytest.skip("pfp_kernels._C is not loaded")
    previous = torch.ops.pfp._attention_cpu_path(request.param)
    yield request.param
    torch.ops.pfp._attention_cpu_path(previous)


def _check_cpp(inputs, dtype, route, what, scale=0.3):
    q, k, v, ck, cv = inputs
    want, want_lse = _ref64(q, k, v, ck, cv, scale=scale)
    out, lse = torch.ops.pfp.joint_attention(q, k, v, ck, cv, scale)
    assert torch.ops.pfp._attention_cpu_last_route() == route
    b, nq, h, d = q.shape
    assert out.shape == (b, nq, h, d) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, h, nq) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert_close(out, want, dtype, what=f"{route} {what} out")
    _lse_close(lse, want_lse, dtype, f"{route} {what} lse")


@pytest.mark.parametrize("cpp_route", CPP_ROUTES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_routes_match_fp64_reference(shape, dtype, cpp_route):
    b, nq, nk, nc, h, d, cb = shape
    _check_cpp(_inputs(b, nq, nk, nc, h, d, dtype, cb), dtype, cpp_route, "x".join(map(str, shape)))


@pytest.mark.parametrize("cpp_route", CPP_ROUTES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_routes_read_strided_inputs(dtype, cpp_route):
    """Views as models produce them: [B, H, N, D] transposed, a head-dim slice with stride 2 along D,
    a context expanded from batch 1 and one sliced out of a longer history."""
    b, nq, nk, nc, h, d = 2, 97, 70, 260, 3, 24
    q = torch.randn(b, h, nq, d, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, nk, h, 2 * d, dtype=dtype)[..., ::2]
    v = torch.randn(b, nk, h, d + 8, dtype=dtype)[..., 8:]
    ck = torch.randn(1, nc + 40, h, d, dtype=dtype)[:, 40:].expand(b, -1, -1, -1)
    cv = torch.randn(1, h, nc, d, dtype=dtype).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, ck, cv)) and k.stride(3) == 2
    _check_cpp((q, k, v, ck, cv), dtype, cpp_route, "strided")


@pytest.mark.parametrize("cpp_route", CPP_ROUTES, indirect=True)
def test_cpp_routes_broadcast_context_equals_per_batch(cpp_route):
    # Per batch the kernel splits the queries differently (fewer tasks), so compare closely, not bitwise.
    q, k, v, ck, cv = _inputs(3, 70, 30, 280, 2, 32, torch.float32, ctx_batch=1)
    out, lse = torch.ops.pfp.joint_attention(q, k, v, ck, cv, 0.2)
    for i in range(3):
        one, one_lse = torch.ops.pfp.joint_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], ck.clone(),
                                                     cv.clone(), 0.2)
        # the same kernel on one batch element: agreement to rounding, as for streaming
        assert_close(out[i:i + 1], one, torch.float32, kind="stream", factor=0.1, what=f"batch {i}")
        assert_close(lse[i:i + 1], one_lse, torch.float32, kind="stream", factor=0.1, what=f"batch {i} lse")


def _cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _extension.has_cpu_kernel("joint_attention"), reason="pfp_kernels._C is not loaded")
def test_cpp_auto_route_is_the_fastest_measured_for_this_cpu():
    # our flash kernel, except bf16 with both segments on an AMX CPU, where ATen's kernel over the
    # concatenation runs bf16 tiles (benchmarks/results/attention/cpu_attention_avx512_amx.md)
    previous = torch.ops.pfp._attention_cpu_path("auto")
    try:
        q, k, v, ck, cv = _inputs(1, 5, 4, 6, 2, 16, torch.bfloat16)
        torch.ops.pfp.joint_attention(q, k, v, ck, cv, 0.25)
        assert torch.ops.pfp._attention_cpu_last_route() == ("concat" if _cpu_has_amx_bf16() else "flash")
        torch.ops.pfp.joint_attention(q.float(), k.float(), v.float(), ck.float(), cv.float(), 0.25)
        assert torch.ops.pfp._attention_cpu_last_route() == "flash"
        torch.ops.pfp.joint_attention(q, k, v, None, None, 0.25)        # one segment: nothing to join
        assert torch.ops.pfp._attention_cpu_last_route() == "flash"
        with pytest.raises(RuntimeError, match="mode must be one of"):
            torch.ops.pfp._attention_cpu_path("fastest")
    finally:
        torch.ops.pfp._attention_cpu_path(previous)


# ----------------------------------------------------------------------------------------------
# LSE and merge identities
# ----------------------------------------------------------------------------------------------
def test_lse_identity_and_merge_is_exact():
    q, k, v, ck, cv = _inputs(2, 9, 11, 13, 2, 16, torch.float64, ctx_batch=1)
    out, lse = pk.joint_attention(q, k, v, ck, cv, impl="torch", return_lse=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q, torch.cat([ck.expand(2, -1, -1, -1), k], 1)) / 4
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    o_c, l_c = pk.joint_attention(q, ck.expand(2, -1, -1, -1), cv.expand(2, -1, -1, -1), impl="torch",
                                  return_lse=True)
    o_t, l_t = pk.joint_attention(q, k, v, impl="torch", return_lse=True)
    merged, merged_lse = pk.merge_attention(o_c, l_c, o_t, l_t)
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    # Symmetric, and a side with lse = -inf (no keys) leaves the other unchanged.
    torch.testing.assert_close(pk.merge_attention(o_t, l_t, o_c, l_c)[0], out)
    empty = torch.full_like(l_t, -math.inf)
    again, again_lse = pk.merge_attention(o_t, l_t, torch.zeros_like(o_t), empty)
    torch.testing.assert_close(again, o_t)
    torch.testing.assert_close(again_lse, l_t)


def test_merge_bad_shapes():
    o = torch.zeros(1, 3, 2, 4)
    with pytest.raises(ValueError, match="lse2"):
        pk.merge_attention(o, torch.zeros(1, 2, 3), o, torch.zeros(1, 3, 2))


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
def _grads(impl, inputs, go, gl, dtype):
    ins = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    out, lse = pk.joint_attention(*ins, scale=0.25, impl=impl, return_lse=True)
    loss = (out.double() * go).sum() + (lse.double() * gl).sum()
    return torch.autograd.grad(loss, [t for t in ins if t is not None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 13, 7, 19, 2, 16, 1), (1, 1, 4, 0, 1, 32, None),
                                   (2, 5, 3, None, 1, 16, None)], ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_fp64_reference(shape, dtype):
    """q, k, v, context_k, context_v gradients, with a loss on both out and lse."""
    b, nq, nk, nc, h, d, cb = shape
    inputs = _inputs(b, nq, nk, nc, h, d, torch.float64, cb)
    ref_in = [None if t is None else t.clone().requires_grad_() for t in inputs]
    out, lse = joint_attention_reference(*ref_in, scale=0.25)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), [t for t in ref_in if t is not None])
    for impl in _backends_here(dtype):
        if impl == "torch":
            continue
        got = _grads(impl, inputs, go, gl, dtype)
        for name, g, w in zip(("q", "k", "v", "context_k", "context_v"), got, want):
            assert g.shape == w.shape, f"{impl} d{name} shape"
            assert_close(g, w, dtype, kind="grad", what=f"{impl} d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradient_without_lse_output(shape, dtype, monkeypatch):
    """No gradient through the lse: on CPU every backend's backward is ATen's flash backward over
    the concatenation (spied on), against the fp64 reference."""
    from pfp_kernels.attention import autograd
    calls = []
    real = autograd._backward_aten_cpu
    monkeypatch.setattr(autograd, "_backward_aten_cpu", lambda *a: calls.append(1) or real(*a))
    b, nq, nk, nc, h, d, cb = shape
    inputs = _inputs(b, nq, nk, nc, h, d, torch.float64, cb)
    go = torch.randn(b, nq, h, d, dtype=torch.float64)
    ref_in = [None if t is None else t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad((joint_attention_reference(*ref_in)[0] * go).sum(),
                               [t for t in ref_in if t is not None])
    for impl in _backends_here(dtype):
        if impl == "torch" or (impl == "triton" and nq * (nk + (nc or 0)) > 2500):
            continue
        ins = [None if t is None else t.to(dtype).requires_grad_() for t in inputs]
        out = pk.joint_attention(*ins, impl=impl)
        got = torch.autograd.grad((out.double() * go).sum(), [t for t in ins if t is not None])
        for name, g, w in zip(("q", "k", "v", "context_k", "context_v"), got, want):
            assert g.shape == w.shape, f"{impl} d{name} shape"
            assert_close(g, w, dtype, kind="grad", what=f"{impl} d{name}")
    backends = [n for n in _backends_here(dtype) if n not in ("torch", "triton", "sdpa_concat")]
    assert len(calls) == len(backends)  # sdpa_concat keeps PyTorch's own backward; triton its kernels


# ----------------------------------------------------------------------------------------------
# registration: opcheck every op, torch.compile once
# ----------------------------------------------------------------------------------------------
def _ops_here():
    ops = ["joint_attention_sdpa", "joint_attention_sdpa_concat"]
    if _extension.has_cpu_kernel("joint_attention"):
        ops.append("joint_attention")
    if _registry.TRITON_AVAILABLE and _registry.TRITON_INTERPRET:
        ops.append("joint_attention_triton")
    return ops


@pytest.mark.skipif(not (_registry.TRITON_AVAILABLE and _registry.TRITON_INTERPRET),
                    reason="needs triton under TRITON_INTERPRET=1")
def test_opcheck_triton_backward_op():
    q, k, v, ck, cv = _inputs(2, 5, 3, 4, 2, 16, torch.float32, ctx_batch=1)
    out, lse = torch.ops.pfp.joint_attention_triton(q, k, v, ck, cv, 0.25)
    args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, ck, cv, out, lse, 0.25)
    torch.library.opcheck(torch.ops.pfp.joint_attention_triton_backward, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("op", _ops_here())
def test_opcheck(op):
    q, k, v, ck, cv = _inputs(2, 5, 3, 4, 2, 16, torch.float32, ctx_batch=1, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.pfp, op), (q, k, v, ck, cv, 0.25))
    # Without context: the cheap checks only (the AOT-dispatch ones above are the slow part).
    torch.library.opcheck(getattr(torch.ops.pfp, op), (q, k, v, None, None, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_ops_without_a_runtime_here_are_registered():
    # flash_attn / xformers need CUDA: their ops exist (fake + autograd) but cannot run on CPU.
    for op in ("joint_attention_flash_attn", "joint_attention_xformers"):
        assert hasattr(torch.ops.pfp, op)
    q = torch.zeros(1, 2, 1, 16)
    reasons = pk.attention_backends(q, q, q, q, q)
    assert "CUDA" in reasons["flash_attn"] and "CUDA" in reasons["xformers"]


def test_torch_compile_fullgraph():
    q, k, v, ck, cv = _inputs(2, 6, 5, 7, 2, 16, torch.float32, ctx_batch=1)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, ck, cv):
        return pk.joint_attention(q, k, v, ck, cv, impl="sdpa", return_lse=True)

    out, lse = f(q, k, v, ck, cv)
    want, want_lse = _ref64(q, k, v, ck, cv)
    assert_close(out, want, torch.float32, what="compiled")
    assert_close(lse, want_lse, torch.float32, what="compiled lse")


def test_optional_backends_are_not_imported_while_torch_compile_traces(monkeypatch):
    # Dynamo cannot trace an import (seen on an H100: fullgraph=True failed inside the flash-attn
    # probe). While tracing, an installed package counts as available until an import has failed,
    # and its op imports it when it runs; a missing one is reported without trying.
    from pfp_kernels import attention
    monkeypatch.setattr(attention.backends, "_INSTALLED", {**attention.backends._INSTALLED, "xformers": True, "flash_attn": False})
    monkeypatch.setattr(attention.backends, "_imported", {})
    monkeypatch.setattr(attention.backends, "_import_failures", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert attention.backends._why_not_importable("xformers.ops.fmha") is None
    assert attention.backends._why_not_importable("flash_attn") == "flash_attn is not installed"
    assert not attention.backends._imported and not attention.backends._import_failures  # nothing was imported
    attention.backends._import_failures["xformers.ops.fmha"] = "broken"
    assert attention.backends._why_not_importable("xformers.ops.fmha") == "broken"


# ----------------------------------------------------------------------------------------------
# backend choice and bad inputs
# ----------------------------------------------------------------------------------------------
def test_auto_on_cpu_follows_the_documented_order():
    q, k, v, ck, cv = _inputs(1, 3, 3, 2, 1, 16, torch.float32)
    reasons = pk.attention_backends(q, k, v, ck, cv)
    assert set(reasons) == set(pk.attention.ATTENTION_BACKENDS)
    expected = next(n for n in ("cpp", "sdpa", "torch") if reasons[n] is None)
    assert reasons["torch"] is None
    # The chosen backend is the first runnable one: forcing it gives the identical result.
    auto = pk.joint_attention(q, k, v, ck, cv)
    torch.testing.assert_close(auto, pk.joint_attention(q, k, v, ck, cv, impl=expected), rtol=0, atol=0)


def test_forced_backend_that_cannot_run_lists_its_reason():
    q, k, v, ck, cv = _inputs(1, 3, 3, 2, 1, 16, torch.float32)
    with pytest.raises(RuntimeError, match="flash_attn.*CUDA"):
        pk.joint_attention(q, k, v, ck, cv, impl="flash_attn")
    with pytest.raises(ValueError, match="impl must be one of"):
        pk.joint_attention(q, k, v, ck, cv, impl="nope")


@pytest.mark.skipif(not (_registry.TRITON_AVAILABLE and _registry.TRITON_INTERPRET),
                    reason="needs triton under TRITON_INTERPRET=1")
def test_triton_rejects_unsupported_head_dim():
    q = torch.zeros(1, 2, 1, 272)
    with pytest.raises(RuntimeError, match="triton.*head dim 272"):
        pk.joint_attention(q, q, q, impl="triton")
    assert pk.joint_attention(q, q, q, impl="sdpa").shape == q.shape  # others still run it


@pytest.mark.parametrize("case, match", [
    (dict(k=(2, 5, 3, 16)), "k has 3 heads"),
    (dict(v=(2, 5, 2, 8)), "v has head dim 8"),
    (dict(k=(1, 5, 2, 16)), "same batch size"),
    (dict(v=(2, 4, 2, 16)), "k and v must have the same length"),
    (dict(context_k=(3, 4, 2, 16), context_v=(3, 4, 2, 16)), "context_k has batch 3"),
    (dict(context_k=(1, 4, 2, 32), context_v=(1, 4, 2, 32)), "context_k must have H=2 heads and head dim D=16"),
    (dict(context_v=(1, 5, 2, 16)), "context_k and context_v must have the same"),
    (dict(context_v=None), "context_k and context_v must be given together"),
    (dict(q=(2, 3, 16)), "q must be 4-D"),
    (dict(k=(2, 0, 2, 16), v=(2, 0, 2, 16), context_k=None, context_v=None), "no keys"),
])
def test_bad_shapes(case, match):
    shapes = dict(q=(2, 3, 2, 16), k=(2, 5, 2, 16), v=(2, 5, 2, 16), context_k=(1, 4, 2, 16),
                  context_v=(1, 4, 2, 16))
    shapes.update(case)
    args = [None if shapes[n] is None else torch.randn(shapes[n]) for n in ("q", "k", "v", "context_k", "context_v")]
    with pytest.raises(ValueError, match=match):
        pk.joint_attention(*args)
    with pytest.raises(ValueError, match=match):
        pk.attention_backends(*args)


def test_dtype_and_device_mismatch():
    q, k, v, ck, cv = _inputs(1, 3, 3, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="context_v dtype torch.float16 does not match q's torch.float32"):
        pk.joint_attention(q, k, v, ck, cv.half())
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        pk.joint_attention(q, k.to("meta"), v, ck, cv)
    with pytest.raises(ValueError, match="floating point"):
        pk.joint_attention(*(t.to(torch.int32) for t in (q, k, v)))


# ----------------------------------------------------------------------------------------------
# context_mask: padded histories in one batch
# ----------------------------------------------------------------------------------------------
def _masks(b, nc, cb, g):
    """A random [B, Nc] mask with one sample fully masked and one unmasked (when B allows), and
    the broadcast [1, Nc] form."""
    mask = torch.rand(b, nc, generator=g) > 0.4
    if b > 1:
        mask[1] = False
    mask[0] = True
    return [mask, mask[:1]] if cb == 1 or b == 1 else [mask]


def _masked_backends(dtype, mask_inputs):
    return [n for n, why in pk.attention_backends(*mask_inputs).items() if why is None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[3]], ids=lambda s: "x".join(map(str, s)))
def test_context_mask_matches_fp64_reference_and_gathered_keys(shape, dtype):
    b, nq, nk, nc, h, d, cb = shape
    g = torch.Generator().manual_seed(1)
    low = _inputs(b, nq, nk, nc, h, d, dtype, cb)
    q, k, v, ck, cv = (t.double() for t in low)  # the reference sees the rounded inputs
    for mask in _masks(b, nc, cb, g):
        want, want_lse = joint_attention_reference(q, k, v, ck, cv, 0.3, mask)
        # the reference itself: a masked key is absent (attention over the gathered valid keys)
        for i in range(b):
            valid = torch.nonzero(mask[min(i, mask.shape[0] - 1)]).flatten()
            cki, cvi = ck[min(i, ck.shape[0] - 1)][None, valid], cv[min(i, cv.shape[0] - 1)][None, valid]
            if nk == 0 and valid.numel() == 0:
                assert (want[i] == 0).all() and torch.isneginf(want_lse[i]).all()
                continue
            gathered, gathered_lse = joint_attention_reference(q[i:i + 1], k[i:i + 1], v[i:i + 1], cki, cvi, 0.3)
            torch.testing.assert_close(want[i:i + 1], gathered)
            torch.testing.assert_close(want_lse[i:i + 1], gathered_lse)
        backends = _masked_backends(dtype, (*low, mask))
        assert {"sdpa_concat", "torch"} <= set(backends)
        for impl in backends:
            out, lse = pk.joint_attention(*low, context_mask=mask, scale=0.3, impl=impl, return_lse=True)
            assert_close(out, want, dtype, what=f"{impl} masked out")
            finite = torch.isfinite(want_lse)
            assert torch.equal(torch.isfinite(lse), finite), impl
            _lse_close(lse[finite], want_lse[finite], dtype, f"{impl} masked lse")
            plain = pk.joint_attention(*low, context_mask=mask, scale=0.3, impl=impl)
            assert_close(plain, want, dtype, what=f"{impl} masked out, no lse")


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("shape", [(3, 6, 5, 7, 2, 16, 1), (2, 4, 0, 6, 1, 16, None)], ids=lambda s: "x".join(map(str, s)))
def test_context_mask_gradients_match_fp64_reference(shape, with_lse):
    b, nq, nk, nc, h, d, cb = shape
    inputs = _inputs(b, nq, nk, nc, h, d, torch.float64, cb)
    (mask, *_) = _masks(b, nc, cb, torch.Generator().manual_seed(2))
    ref_in = [t.clone().requires_grad_() for t in inputs]
    out, lse = joint_attention_reference(*ref_in, 0.25, mask)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    loss = lambda o, l: (o.double() * go).sum() + ((l.double().nan_to_num(0, 0, 0) * gl).sum() if with_lse else 0)  # noqa: E731
    want = torch.autograd.grad(loss(out, lse), ref_in)
    for impl in _masked_backends(torch.float32, [t.float() for t in inputs] + [mask]):
        if impl == "torch":
            continue
        ins = [t.detach().float().requires_grad_() for t in inputs]
        o, l = pk.joint_attention(*ins, context_mask=mask, scale=0.25, impl=impl, return_lse=True)
        got = torch.autograd.grad(loss(o, l), ins)
        for name, gt, w in zip(("q", "k", "v", "context_k", "context_v"), got, want):
            assert gt.isfinite().all(), f"{impl} d{name}"
            assert_close(gt, w, torch.float32, kind="grad", what=f"{impl} masked d{name}")


@pytest.mark.parametrize("shape", [(3, 6, 5, 7, 2, 16, 1), (3, 6, 5, 7, 2, 16, None), (2, 9, 1, 4, 3, 8, None)],
                         ids=lambda s: "x".join(map(str, s)))
def test_masked_cuda_backward_through_sdpa_matches_fp64_reference(shape):
    # the backward a masked call takes on CUDA (PyTorch's SDPA over the concatenation, its forward
    # recomputed: O(N) memory there), run here on CPU tensors, fp64, against the reference; a
    # sample whose context is all masked still has its target keys
    from pfp_kernels.attention import autograd
    b, nq, nk, nc, h, d, cb = shape
    inputs = _inputs(b, nq, nk, nc, h, d, torch.float64, cb)
    for mask in _masks(b, nc, cb, torch.Generator().manual_seed(3)):
        ref_in = [t.clone().requires_grad_() for t in inputs]
        out, lse = joint_attention_reference(*ref_in, 0.25, mask)
        go = torch.randn_like(out)
        want = torch.autograd.grad((out * go).sum(), ref_in)
        got = autograd._backward_sdpa_recompute(go, *inputs, 0.25, mask)
        for name, g, w in zip(("q", "k", "v", "context_k", "context_v"), got, want):
            assert g.shape == w.shape, name
            assert_close(g, w, torch.float64, kind="grad", what=f"sdpa recompute d{name}")
    assert not autograd._sdpa_recompute_backward_ok(inputs[0], inputs[1], None, mask)   # CPU: ATen's flash backward


def test_a_masked_call_takes_the_sdpa_recompute_backward_where_it_applies(monkeypatch):
    # the dispatch in the shared backward: told it is on CUDA, a masked call's gradients come from
    # the SDPA recompute (spied on), and they match the fp64 reference
    from pfp_kernels.attention import autograd
    calls = []
    real = autograd._backward_sdpa_recompute
    monkeypatch.setattr(autograd, "_sdpa_recompute_backward_ok",
                        lambda q, k, grad_lse, mask: mask is not None and autograd._lse_grad_is_zero(grad_lse))
    monkeypatch.setattr(autograd, "_backward_sdpa_recompute", lambda *a: calls.append(1) or real(*a))
    inputs = _inputs(2, 6, 5, 7, 2, 16, torch.float64, 1)
    (mask, *_) = _masks(2, 7, 1, torch.Generator().manual_seed(4))
    ref_in = [t.clone().requires_grad_() for t in inputs]
    go = torch.randn(2, 6, 2, 16, dtype=torch.float64)
    want = torch.autograd.grad((joint_attention_reference(*ref_in, 0.25, mask)[0] * go).sum(), ref_in)
    ins = [t.clone().requires_grad_() for t in inputs]
    got = torch.autograd.grad((pk.joint_attention(*ins, context_mask=mask, scale=0.25, impl="sdpa") * go).sum(), ins)
    assert calls == [1]
    for name, g, w in zip(("q", "k", "v", "context_k", "context_v"), got, want):
        assert_close(g, w, torch.float64, kind="grad", what=f"d{name}")


def test_context_mask_all_true_equals_no_mask_and_ops_pass_opcheck():
    q, k, v, ck, cv = _inputs(2, 5, 3, 4, 2, 16, torch.float32, ctx_batch=1, requires_grad=True)
    ones = torch.ones(1, 4, dtype=torch.bool)
    impls = ["sdpa", "sdpa_concat"] + (["cpp"] if _extension.has_cpu_kernel("joint_attention") else [])
    for impl in impls:
        torch.testing.assert_close(pk.joint_attention(q, k, v, ck, cv, context_mask=ones, impl=impl),
                                   pk.joint_attention(q, k, v, ck, cv, impl=impl))
        mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
        op = getattr(torch.ops.pfp, "joint_attention" if impl == "cpp" else f"joint_attention_{impl}")
        torch.library.opcheck(op, (q, k, v, ck, cv, 0.25, mask))


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 4), "must be a bool tensor"),
    (torch.ones(3, 4, dtype=torch.bool), r"must be \[1 or 2, Nc=4\]"),
    (torch.ones(2, 5, dtype=torch.bool), r"must be \[1 or 2, Nc=4\]"),
    (torch.ones(4, dtype=torch.bool), r"must be \[1 or 2, Nc=4\]"),
])
def test_bad_context_mask(mask, match):
    q, k, v, ck, cv = _inputs(2, 3, 3, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        pk.joint_attention(q, k, v, ck, cv, context_mask=mask)
    with pytest.raises(ValueError, match="without a context"):
        pk.joint_attention(q, k, v, context_mask=torch.ones(2, 4, dtype=torch.bool))
    reasons = pk.attention_backends(q, k, v, ck, cv, torch.ones(2, 4, dtype=torch.bool))
    assert "CUDA" in reasons["flash_attn"] or "takes no context_mask" in reasons["flash_attn"]


@pytest.mark.parametrize("cpp_route", CPP_ROUTES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [s for s in CPP_SHAPES if s[3]], ids=lambda s: "x".join(map(str, s)))
def test_cpp_routes_take_the_context_mask(shape, dtype, cpp_route):
    """Every C++ route with a key mask (one fully masked sample, a batch-1 mask), against the fp64
    reference; the flash route's blocks of masked keys and rows with no valid key yet included."""
    b, nq, nk, nc, h, d, cb = shape
    q, k, v, ck, cv = _inputs(b, nq, nk, nc, h, d, dtype, cb)
    for mask in _masks(b, nc, cb, torch.Generator().manual_seed(3)):
        want, want_lse = joint_attention_reference(*(t.double() for t in (q, k, v, ck, cv)), 0.3, mask)
        out, lse = torch.ops.pfp.joint_attention(q, k, v, ck, cv, 0.3, mask)
        assert torch.ops.pfp._attention_cpu_last_route() == cpp_route
        assert_close(out, want, dtype, what=f"{cpp_route} masked out")
        finite = torch.isfinite(want_lse)
        assert torch.equal(torch.isfinite(lse), finite), cpp_route
        _lse_close(lse[finite], want_lse[finite], dtype, f"{cpp_route} masked lse")
