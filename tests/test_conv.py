"""Tests of conv3d_act, causal_conv3d_act and project_tokens for impl="cpp" and impl="torch".

The C++ kernels have two families (oneDNN through ATen, and the direct at::vec kernel) chosen per
call; the `cpu_path` parameter forces each one so both are checked on every case, plus "auto".
Triton runs the same checks from tests/test_conv_triton.py via tests/conv_cases.py.
"""
from __future__ import annotations

import importlib.machinery
import os
import re
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pfp_kernels as pk
from pfp_kernels.testing import assert_close
from pfp_kernels import _extension, conv as C, nn as pnn

from conv_cases import (ConvCase, assert_close_to_reference, assert_dense_channels_last, check_causal_streaming,
                        check_conv3d_act, check_project_tokens, make_activation, make_params, random_chunk_plan,
                        random_conv_case)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CPP = _extension.has_cpu_kernel("conv3d_act")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ kernels not loaded: {_extension.REASON or 'no CPU kernel'}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (impl, cpu path): the C++ op under each of its kernel families, and the reference.
IMPL_PATHS = [pytest.param("cpp", "direct", marks=needs_cpp, id="cpp-direct"),
              pytest.param("cpp", "onednn", marks=needs_cpp, id="cpp-onednn"),
              pytest.param("cpp", "auto", marks=needs_cpp, id="cpp-auto"),
              pytest.param("torch", None, id="torch")]


@pytest.fixture
def cpu_path(request):
    """Force the C++ kernel family for the test, restore afterwards."""
    mode = getattr(request, "param", None)
    if mode is None or not HAS_CPP:
        yield mode
        return
    previous = torch.ops.pfp._conv_cpu_path(mode)
    try:
        yield mode
    finally:
        torch.ops.pfp._conv_cpu_path(previous)


def _impl_paths(fn):
    return pytest.mark.parametrize("impl,cpu_path", IMPL_PATHS, indirect=["cpu_path"])(fn)


# ----------------------------------------------------------------------------------------------
# correctness against the fp64 reference
# ----------------------------------------------------------------------------------------------
@_impl_paths
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv3d_act_random_shapes(impl, cpu_path, dtype):
    rng = random.Random(1000 + DTYPES.index(dtype))
    for i in range(8):
        check_conv3d_act(impl, dtype, random_conv_case(rng), seed=i)


# fp64 runs the C++ paths only: impl="torch" in fp64 is the reference itself
@pytest.mark.parametrize("impl,cpu_path", IMPL_PATHS[:3], indirect=["cpu_path"])
def test_conv3d_act_float64(impl, cpu_path):
    rng = random.Random(7)
    for i in range(4):
        check_conv3d_act(impl, torch.float64, random_conv_case(rng), seed=i)


@_impl_paths
@pytest.mark.parametrize("case", [
    # compressor-like stage, strides that skip input, kernel 1, padding beyond the kernel's reach
    ConvCase(1, 16, 24, (7, 9, 11), (3, 3, 3), (2, 1, 1), (1, 1, 1), True, "silu"),
    ConvCase(2, 8, 16, (5, 8, 9), (3, 3, 3), (1, 2, 2), (1, 1, 1), True, "silu", layout="contiguous"),
    ConvCase(1, 3, 5, (1, 1, 1), (1, 1, 1), (1, 1, 1), (0, 0, 0), False, None),
    ConvCase(1, 4, 6, (4, 5, 3), (1, 3, 1), (3, 1, 2), (1, 3, 1), True, "silu", layout="strided"),
    ConvCase(1, 5, 7, (3, 2, 2), (3, 3, 3), (3, 3, 3), (2, 2, 2), True, "silu"),
    # one input channel, a W stride above 1 and one output column: oneDNN misreads its own
    # prepacked weight here (errors of 1e6 and NaN before the C++ op stopped prepacking Cin = 1)
    ConvCase(1, 1, 64, (8, 64, 3), (3, 3, 2), (1, 1, 2), (1, 1, 0), False, None),
    ConvCase(2, 1, 8, (2, 12, 1), (2, 3, 2), (2, 1, 2), (1, 0, 1), True, "silu"),
    ConvCase(1, 1, 2, (11, 5, 1), (2, 1, 3), (1, 1, 3), (0, 0, 2), True, None, layout="strided"),
], ids=str)
def test_conv3d_act_edge_cases(impl, cpu_path, case):
    check_conv3d_act(impl, torch.float32, case)


@_impl_paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_causal_streaming_random_plans(impl, cpu_path, dtype):
    rng = random.Random(2000 + DTYPES.index(dtype))
    for i in range(5):
        case = random_conv_case(rng, causal=True)
        total = rng.randint(1, 13)
        check_causal_streaming(impl, dtype, case, random_chunk_plan(rng, total, case.stride[0]), seed=i)


@_impl_paths
@pytest.mark.parametrize("stride_t", [1, 2, 3])
def test_causal_streaming_one_frame_chunks(impl, cpu_path, stride_t):
    case = ConvCase(1, 4, 16, (0, 5, 6), (3, 3, 3), (stride_t, 1, 2), (0, 1, 1), True, "silu")
    check_causal_streaming(impl, torch.float32, case, [1] * 9)
    # chunks that split stride groups, then a long one, with batch 2
    case.batch = 2
    check_causal_streaming(impl, torch.float32, case, [2, 1, 0, 4, 1, 11])


@_impl_paths
def test_causal_streaming_float64(impl, cpu_path):
    case = ConvCase(2, 3, 5, (0, 4, 5), (3, 1, 3), (2, 1, 1), (0, 0, 1), True, "silu", layout="contiguous")
    check_causal_streaming(impl, torch.float64, case, [1, 2, 3, 1, 5])


@_impl_paths
@pytest.mark.parametrize("kernel_t,stride_t", [(3, 1), (3, 2), (3, 3), (1, 2), (2, 4), (5, 2)])
def test_a_state_continues_the_same_from_its_phase(impl, cpu_path, kernel_t, stride_t):
    """Continuing a state or its at_phase() copy gives the same outputs and keeps the same frames,
    whatever the chunk; only frames_seen differs, by what the phase dropped (what lets a CUDA graph
    captured at one point of a stream replay at another)."""
    g = torch.Generator().manual_seed(kernel_t * 10 + stride_t)
    w = torch.randn(5, 3, kernel_t, 3, 1, dtype=torch.float64, generator=g)
    b = torch.randn(5, dtype=torch.float64, generator=g)
    run = lambda x, st: C.causal_conv3d_act(x, w, b, (stride_t, 1, 1), (1, 0), "silu", state=st, impl=impl)
    state, phases = None, set()
    for n in [1, 2, 1, 0, 3, 1, 1, 2, 4, 1, 5, 2, 1, 3]:
        x = torch.randn(2, 3, n, 4, 3, dtype=torch.float64, generator=g)
        if state is not None:
            p = state.phase()
            phases.add(p)
            assert p <= state.frames_seen and (state.frames_seen - p) % stride_t == 0
            assert p == state.frames_seen or p >= kernel_t - 1
            y_at, st_at = run(x, state.at_phase())
        y, new = run(x, state)
        if state is not None:
            torch.testing.assert_close(y_at, y, rtol=0, atol=0)
            assert (st_at.frames is None) == (new.frames is None)
            if new.frames is not None:
                torch.testing.assert_close(st_at.frames, new.frames, rtol=0, atol=0)
            assert new.frames_seen - st_at.frames_seen == state.frames_seen - state.phase()
        state = new
    assert max(phases) < kernel_t - 1 + stride_t   # bounded: few distinct phases, few graphs


@needs_cpp
@pytest.mark.parametrize("cpu_path", ["direct", "onednn"], indirect=True)
def test_causal_op_direct_call_reads_prev_and_x(cpu_path):
    """The raw op with a prev tensor, nonzero time_offset and a non-channels-last prev."""
    g = torch.Generator().manual_seed(3)
    case = ConvCase(1, 6, 16, (0, 5, 7), (3, 3, 3), (1, 1, 1), (0, 1, 1), True, "silu")
    w, b = make_params(case, torch.float32, generator=g)
    prev = torch.randn(1, 6, 2, 5, 7, generator=g)               # NCDHW on purpose
    x = make_activation((1, 6, 9, 5, 7), torch.float32, "channels_last", generator=g)
    for time_offset, num_out in [(0, 9), (1, 8), (-2, 11), (-1, 5)]:
        y = torch.ops.pfp.causal_conv3d_act(x, prev, w, b, [1, 1, 1], [1, 1], "silu", time_offset, num_out)
        ref = C.causal_conv3d_act_reference(x.double(), prev.double(), w.double(), b.double(), [1, 1, 1],
                                            [1, 1], "silu", time_offset, num_out)
        assert_close_to_reference(y, ref, torch.float32, f"offset {time_offset} n {num_out}")
        assert_dense_channels_last(y)


@_impl_paths
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_project_tokens(impl, cpu_path, dtype):
    if impl == "torch" and dtype == torch.float64:
        pytest.skip("impl='torch' in float64 is the reference itself")
    for i, (shape, cout, bias, residual, layout) in enumerate([
        ((1, 16, 3, 4, 5), 24, True, True, "channels_last"),
        ((2, 7, 1, 3, 1), 5, False, True, "contiguous"),
        ((1, 9, 2, 3, 3), 1, True, False, "strided"),
        ((2, 4, 2, 2, 3), 8, False, False, "channels_last"),
    ]):
        check_project_tokens(impl, dtype, shape, cout, bias, residual, layout, seed=i)


# ----------------------------------------------------------------------------------------------
# which C++ kernel runs (the plan is what the benchmark decided; here: each plan is reachable)
# ----------------------------------------------------------------------------------------------
@needs_cpp
def test_cpp_plan_is_a_function_of_shapes_and_costs():
    # pfp::_conv_cpu_plan asks the planner without running anything; it agrees with what a run
    # reports, and the cost model's inputs move its choice (here: the tiny-conv threshold).
    case = ConvCase(1, 8, 16, (0, 6, 7), (3, 3, 3), (1, 1, 1), (0, 1, 1), True, "silu")
    g = torch.Generator().manual_seed(0)
    w, b = make_params(case, torch.float32, generator=g)
    x = make_activation((1, 8, 40, 6, 7), torch.float32, "channels_last", generator=g)
    pk.causal_conv3d_act(x, w, b, 1, 1, impl="cpp")
    ran = torch.ops.pfp._conv_cpu_last_plan()
    asked = torch.ops.pfp._conv_cpu_plan(list(x.shape), 0, list(w.shape), [1, 1, 1], [1, 1], -2, 40,
                                         torch.float32, [])
    assert asked == ran, (asked, ran)
    defaults = torch.ops.pfp._conv_cpu_costs([])
    assert len(defaults) == 7 and all(v > 0 for v in defaults)
    tiny_threshold = list(defaults)
    tiny_threshold[3] = 1e12  # onednn_min_flops_per_weight: nothing counts as big enough for oneDNN
    assert torch.ops.pfp._conv_cpu_plan(list(x.shape), 0, list(w.shape), [1, 1, 1], [1, 1], -2, 40,
                                        torch.float32, tiny_threshold).startswith("direct")
    previous = torch.ops.pfp._conv_cpu_costs(tiny_threshold)
    try:
        assert previous == defaults
        pk.causal_conv3d_act(x, w, b, 1, 1, impl="cpp")
        assert torch.ops.pfp._conv_cpu_last_plan().startswith("direct")
    finally:
        torch.ops.pfp._conv_cpu_costs(previous)
    assert torch.ops.pfp._conv_cpu_costs([]) == defaults
    with pytest.raises(RuntimeError, match="costs must hold 7 values"):
        torch.ops.pfp._conv_cpu_costs([1.0])
    with pytest.raises(RuntimeError, match="copy_ns_per_elem must be a finite number > 0"):
        torch.ops.pfp._conv_cpu_costs([50.0, -1.0, 1.3, 40.0, 8.0, 1.0, 1.0])
    with pytest.raises(RuntimeError, match="_conv_cpu_plan: copy_ns_per_elem must be a finite number > 0"):
        torch.ops.pfp._conv_cpu_plan(list(x.shape), 0, list(w.shape), [1, 1, 1], [1, 1], -2, 40, torch.float32,
                                     [50.0, 0.0, 1.3, 40.0, 8.0, 1.0, 1.0])


@needs_cpp
def test_cpp_short_append_goes_to_onednn_by_its_flops():
    # A short append after a state (2 state frames, 3 new ones) runs oneDNN over a gathered window
    # with a cached prepacked weight, so only its fixed per-call cost counts against it: small
    # convs take the direct kernel whatever their weight's size, large ones oneDNN.
    def ask(cin, cout, hw, costs):
        return torch.ops.pfp._conv_cpu_plan([1, cin, 3, *hw], 2, [cout, cin, 3, 3, 3], [1, 1, 1], [1, 1], 0, 3,
                                            torch.float32, costs)
    assert ask(16, 32, (4, 12), []) == "direct[0,3)"             # 4 MFLOP
    assert ask(256, 512, (2, 6), []) == "onednn-window[0,3)"     # 64 MFLOP on 9 output positions
    costs = torch.ops.pfp._conv_cpu_costs([])
    costs[6] = 1.0                                                # window_min_flops
    assert ask(16, 32, (4, 12), costs) == "onednn-window[0,3)"
    costs[6] = 1e12
    assert ask(256, 512, (2, 6), costs) == "direct[0,3)"


@needs_cpp
def test_cpp_plans_cover_both_layouts_and_boundary_frames():
    torch.ops.pfp._conv_cpu_path("onednn")
    try:
        case = ConvCase(1, 8, 16, (0, 6, 7), (3, 3, 3), (1, 1, 1), (0, 1, 1), True, "silu")
        g = torch.Generator().manual_seed(0)
        w, b = make_params(case, torch.float32, generator=g)
        x = make_activation((1, 8, 40, 6, 7), torch.float32, "channels_last", generator=g)
        plans = []
        state = None
        for n in (40, 3, 40):  # fresh long chunk, short chunk after state, long chunk after state
            _, state = pk.causal_conv3d_act(x[:, :, :n], w, b, 1, 1, state=state, impl="cpp")
            plans.append(torch.ops.pfp._conv_cpu_last_plan())
        assert plans[0].startswith("onednn-aligned") and "gathered" not in plans[0], plans
        assert plans[1] == "onednn-window[0,3)", plans  # short append: one call over [state ; chunk]
        assert plans[2].startswith("onednn-aligned") and "+gathered[0,2)" in plans[2], plans
        # one frame after a state: its only output reads state frames, and still runs as one window
        whole, _ = pk.causal_conv3d_act(x, w, b, 1, 1, impl="torch")
        _, state1 = pk.causal_conv3d_act(x[:, :, :39], w, b, 1, 1, impl="cpp")
        last, _ = pk.causal_conv3d_act(x[:, :, 39:], w, b, 1, 1, state=state1, impl="cpp")
        assert torch.ops.pfp._conv_cpu_last_plan() == "onednn-window[0,1)", torch.ops.pfp._conv_cpu_last_plan()
        assert_close(last, whole[:, :, 39:], torch.float32)
        # batch > 1, a longer chunk after state: the copied layout (inner outputs from x's slice)
        x2 = make_activation((2, 8, 52, 6, 7), torch.float32, "channels_last", generator=g)
        _, state = pk.causal_conv3d_act(x2[:, :, :40], w, b, 1, 1, impl="cpp")
        pk.causal_conv3d_act(x2[:, :, 40:], w, b, 1, 1, state=state, impl="cpp")
        plan = torch.ops.pfp._conv_cpu_last_plan()
        assert plan.startswith("onednn-copied") and "+gathered[0,2)" in plan, plan
        # fp64 has no oneDNN conv: the direct kernel runs
        pk.conv3d_act(x[:, :, :3].double(), w.double(), b.double(), 1, 1, impl="cpp")
        assert torch.ops.pfp._conv_cpu_last_plan().startswith("direct"), torch.ops.pfp._conv_cpu_last_plan()
        # bf16: oneDNN's own bf16 conv where this CPU has one, else through fp32 once each way
        pk.conv3d_act(x[:, :, :3].bfloat16(), w.bfloat16(), b.bfloat16(), 1, 1, impl="cpp")
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        assert torch.ops.pfp._conv_cpu_last_plan().endswith("via fp32") != native, torch.ops.pfp._conv_cpu_last_plan()
    finally:
        torch.ops.pfp._conv_cpu_path("auto")
    with pytest.raises(RuntimeError, match="mode must be one of"):
        torch.ops.pfp._conv_cpu_path("fastest")


def _weight_cache_case(seed: int, what: str):
    """A weight and ``check(weight)``: the C++ conv with that weight against the fp64 reference, on
    one fixed input (for the tests of the kernels' weight-derived caches)."""
    case = ConvCase(1, 8, 16, (5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1), True, "silu")
    g = torch.Generator().manual_seed(seed)
    x = make_activation((1, 8, 5, 6, 7), torch.float32, "channels_last", generator=g)
    w, b = make_params(case, torch.float32, generator=g)

    def check(weight):
        y = pk.conv3d_act(x, weight, b, 1, 1, impl="cpp")
        ref = C.conv3d_act_reference(x.double(), weight.double(), b.double(), [1, 1, 1], [1, 1, 1], "silu")
        assert_close_to_reference(y, ref, torch.float32, what)
    return w, check


@needs_cpp
@pytest.mark.parametrize("cpu_path", ["direct", "onednn"], indirect=True)
def test_cached_weights_follow_in_place_updates_and_new_tensors(cpu_path):
    """The C++ side caches weight-derived tensors (packed panels, oneDNN's blocked weight) by
    content; an in-place update (also through .data, which has its own version counter), a fresh
    tensor at a recycled address, or an inference tensor must never be served a stale copy."""
    w, check = _weight_cache_case(11, "cached weight")
    check(w)
    with torch.no_grad():
        w.mul_(-0.5)       # same tensor, same storage, new version
    check(w)
    w.data[3, 2, 1, 1, 1] += 0.25   # one element, through .data: the version counter does not move
    check(w)
    for _ in range(3):     # new tensors, possibly at recycled addresses
        check(torch.randn_like(w) * 0.1)
    with torch.inference_mode():
        wi = torch.randn_like(w) * 0.1
    check(wi)


@needs_cpp
@pytest.mark.parametrize("cpu_path", ["direct", "onednn"], indirect=True)
def test_frozen_weights_follow_versioned_updates_and_restore_the_setting(cpu_path):
    """Inside pk.frozen_weights() the content hash is kept per (storage, shape, version): updates
    that bump the version (in-place ops, load_state_dict), new tensors and recycled addresses are
    still seen; the setting nests and is restored on exit, and outside it .data writes are seen."""
    w, check = _weight_cache_case(12, "frozen weight")
    with pk.frozen_weights():
        check(w)
        with torch.no_grad():
            w.mul_(-0.5)                    # a new version: seen
        check(w)
        with pk.frozen_weights(), torch.no_grad():   # nested; copy_ is an in-place op too
            w.copy_(torch.randn_like(w) * 0.1)
        check(w)
        assert torch.ops.pfp._conv_cpu_frozen_weights(True) is True    # still frozen after the inner exit
        for _ in range(20):                  # new tensors at recycled addresses (version 0 each time)
            check(torch.randn_like(w) * 0.1)
    assert torch.ops.pfp._conv_cpu_frozen_weights(False) is False      # restored
    w.data[3, 2, 1, 1, 1] += 0.25            # outside: content-hashed again, so .data writes are seen
    check(w)


# ----------------------------------------------------------------------------------------------
# gradients, opcheck, torch.compile
# ----------------------------------------------------------------------------------------------
def _small_inputs(dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 4, 3, 4, dtype=dtype, generator=g).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(3, 2, 3, 3, 1, dtype=dtype, generator=g) * 0.4
    b = torch.randn(3, dtype=dtype, generator=g)
    prev = torch.randn(1, 2, 2, 3, 4, dtype=dtype, generator=g)
    return [t.requires_grad_(requires_grad) for t in (x, w, b, prev)]


@pytest.mark.parametrize("impl", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_gradcheck(impl):
    x, w, b, prev = _small_inputs()
    # fast_mode: checks J against random projections, keeps this test short on 2 cores
    assert torch.autograd.gradcheck(lambda x, w, b: pk.conv3d_act(x, w, b, (2, 1, 1), (1, 1, 0), impl=impl),
                                    (x, w, b), fast_mode=True)
    if impl == "cpp":  # the raw op with a prev source (the public API builds prev itself)
        assert torch.autograd.gradcheck(
            lambda x, p, w, b: torch.ops.pfp.causal_conv3d_act(x, p, w, b, [1, 1, 1], [1, 0], "silu", -1, 4),
            (x, prev, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, w, b: pk.causal_conv3d_act(x, w, b, (2, 1, 1), (1, 0),
                                                                         impl=impl)[0], (x, w, b),
                                    fast_mode=True)
    h = x.detach().clone().requires_grad_()
    pw = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    pb = torch.randn(5, dtype=torch.float64, requires_grad=True)
    res = torch.randn(1, 48, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w, b, r: pk.project_tokens(h, w, b, r, impl=impl), (h, pw, pb, res),
                                    fast_mode=True)


@needs_cpp
def test_opcheck():
    from torch.library import opcheck
    for dtype in (torch.float32,):
        x, w, b, prev = _small_inputs(dtype)
        opcheck(torch.ops.pfp.conv3d_act.default, (x, w, b, [2, 1, 1], [1, 1, 0], "silu"))
        opcheck(torch.ops.pfp.conv3d_act.default, (x.detach().contiguous(), w, None, [1, 1, 1], [0, 0, 0], "none"))
        opcheck(torch.ops.pfp.causal_conv3d_act.default, (x, prev, w, b, [1, 1, 1], [1, 0], "silu", 0, 4))
        opcheck(torch.ops.pfp.causal_conv3d_act.default, (x, None, w, b, [2, 1, 1], [1, 0], "silu", -2, 2))
        opcheck(torch.ops.pfp.causal_conv3d_act.default, (x[:, :, :0], None, w, None, [1, 1, 1], [0, 0], "none", -2, 0))
        pw = torch.randn(5, 2, dtype=dtype, requires_grad=True)
        res = torch.randn(1, 48, 5, dtype=dtype, requires_grad=True)
        opcheck(torch.ops.pfp.project_tokens.default, (x, pw, b.detach()[:1].expand(5).contiguous(), res))
        opcheck(torch.ops.pfp.project_tokens.default, (x.detach().contiguous(), pw, None, None))


@needs_cpp
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, prev = _small_inputs(torch.float32, requires_grad=False)

    def f(x, prev, w, b, pw):
        y = pk.conv3d_act(x, w, b, (1, 1, 1), (1, 1, 0), impl="cpp")
        z = torch.ops.pfp.causal_conv3d_act(x, prev, w, b, [1, 1, 1], [1, 0], "silu", 0, 4)
        t = pk.project_tokens(z, pw, None, None, impl="cpp")
        return y, z, t

    pw = torch.randn(5, 3)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got = compiled(x, prev, w, b, pw)
    want = f(x, prev, w, b, pw)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# nn modules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_nn_modules(impl):
    torch.manual_seed(0)
    conv = pnn.Conv3dAct(4, 8, 3, stride=(1, 2, 2), padding=1, impl=impl)
    x = torch.randn(1, 4, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    y = conv(x)
    ref = F.silu(F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), (1, 2, 2), 1))
    assert_close_to_reference(y.detach(), ref, torch.float32, "Conv3dAct")
    y.sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert "stride=(1, 2, 2)" in repr(conv)

    causal = pnn.CausalConv3dAct(4, 8, 3, stride=(2, 1, 1), padding_hw=1, impl=impl)
    whole, _ = causal(x)
    steps, state = [], None
    with torch.no_grad():
        for i, j in ((0, 1), (1, 4), (4, 5)):
            y, state = causal(x[:, :, i:j], state)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 2), whole.detach(), rtol=1e-5, atol=1e-6)
    assert state.frames_seen == 5 and state.frames.shape[2] <= 2
    # the state is a value: the module keeps nothing, so two streams through it never mix, and a
    # state can be continued twice from the same point
    assert not any(torch.is_tensor(v) for k, v in vars(causal).items() if not k.startswith("_"))
    with torch.no_grad():
        _, half = causal(x[:, :, :2])
        a, _ = causal(x[:, :, 2:], half)
        causal(torch.randn_like(x), None)                       # another stream in between
        b, _ = causal(x[:, :, 2:], half)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([causal(x[:, :, :2])[0], a], 2), whole.detach(), rtol=1e-5, atol=1e-6)
    # a state of another geometry is refused, naming what differs
    other = pnn.CausalConv3dAct(4, 8, 3, stride=(1, 1, 1), padding_hw=1, impl=impl)
    with pytest.raises(ValueError, match="stride"):
        other(x, state)

    proj = pnn.TokenProjection(8, 6, impl=impl)
    res = torch.randn(1, 5 * 3 * 4, 6)
    h = conv(x)
    t = proj(h, res)
    ref = C.project_tokens_reference(h.double(), proj.weight.double(), proj.bias.double(), res.double())
    assert_close_to_reference(t.detach(), ref, torch.float32, "TokenProjection")


# ----------------------------------------------------------------------------------------------
# bad input: each names the argument and what is valid
# ----------------------------------------------------------------------------------------------
def _bad(fn, exc, *words):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for word in words:
        assert word in msg, f"message {msg!r} does not mention {word!r}"


@pytest.mark.parametrize("impl", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_bad_input(impl):
    x = torch.randn(1, 4, 3, 5, 5)
    w = torch.randn(8, 4, 3, 3, 3)
    _bad(lambda: pk.conv3d_act(x[0], w, impl=impl), ValueError, "x must be 5-D")
    _bad(lambda: pk.conv3d_act(x, w[0], impl=impl), ValueError, "weight must be 5-D")
    _bad(lambda: pk.conv3d_act(x, w[:, :3], impl=impl), ValueError, "channels", "Cin=3")
    _bad(lambda: pk.conv3d_act(x, w, stride=0, impl=impl), ValueError, "stride", ">= 1")
    _bad(lambda: pk.conv3d_act(x, w, stride=(1, 0, 1), impl=impl), ValueError, "stride")
    _bad(lambda: pk.conv3d_act(x, w, padding=-1, impl=impl), ValueError, "padding")
    _bad(lambda: pk.conv3d_act(x, w, torch.randn(7), impl=impl), ValueError, "bias")
    _bad(lambda: pk.conv3d_act(x, w.double(), impl=impl), ValueError, "weight", "dtype")
    _bad(lambda: pk.conv3d_act(x.int(), w.int(), impl=impl), ValueError, "x dtype", "float64", "torch.int32")
    _bad(lambda: pk.conv3d_act(x[:, :, :0], w, padding=1, impl=impl), ValueError, "empty time", "T=0")
    _bad(lambda: pk.conv3d_act(x, w, activation="relu", impl=impl), ValueError, "activation", "silu")
    _bad(lambda: pk.conv3d_act(x, w, impl="cuda"), ValueError, "impl", "'cpp'", "'torch'")
    _bad(lambda: pk.conv3d_act(x[..., :1], w, impl=impl), ValueError, "W=1", "too small")
    _bad(lambda: pk.causal_conv3d_act(x, w, activation="gelu", impl=impl), ValueError, "activation")
    _bad(lambda: pk.causal_conv3d_act(x, w, stride=(0, 1, 1), impl=impl), ValueError, "stride")
    _bad(lambda: pk.causal_conv3d_act(x, w, padding_hw=(1, 1, 1), impl=impl), ValueError, "padding_hw")
    _bad(lambda: pk.causal_conv3d_act(x, w, impl="fast"), ValueError, "impl")
    _bad(lambda: pk.project_tokens(x[0], torch.randn(6, 4), impl=impl), ValueError, "h must be 5-D")
    _bad(lambda: pk.project_tokens(x, torch.randn(6, 5), impl=impl), ValueError, "weight", "C=4")
    _bad(lambda: pk.project_tokens(x, torch.randn(6, 4), residual=torch.randn(1, 75, 5), impl=impl),
         ValueError, "residual", "(1, 75, 6)")
    _bad(lambda: pk.project_tokens(x, torch.randn(6, 4), impl="gpu"), ValueError, "impl")
    for dtype in (torch.int32, torch.bool):
        _bad(lambda: pk.project_tokens(x.to(dtype), torch.randn(6, 4).to(dtype), impl=impl), ValueError,
             "h dtype", "float32")


@pytest.mark.parametrize("impl", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_bad_state(impl):
    x = torch.randn(1, 4, 3, 5, 5)
    w = torch.randn(8, 4, 3, 3, 3)
    _, state = pk.causal_conv3d_act(x, w, padding_hw=1, impl=impl)
    w2 = torch.randn(8, 4, 1, 3, 3)
    _bad(lambda: pk.causal_conv3d_act(x, w2, padding_hw=1, state=state, impl=impl), ValueError, "state", "weight shape")
    _bad(lambda: pk.causal_conv3d_act(x[..., :4], w, padding_hw=1, state=state, impl=impl), ValueError, "state", "W")
    _bad(lambda: pk.causal_conv3d_act(torch.cat([x, x]), w, padding_hw=1, state=state, impl=impl),
         ValueError, "state", "batch size")
    _bad(lambda: pk.causal_conv3d_act(x.double(), w.double(), padding_hw=1, state=state, impl=impl),
         ValueError, "state", "dtype")
    _bad(lambda: pk.causal_conv3d_act(x, w, padding_hw=0, state=state, impl=impl), ValueError, "state", "padding_hw")
    _bad(lambda: pk.causal_conv3d_act(x, w, padding_hw=1, state="frames", impl=impl), ValueError, "state",
         "CausalConvState")
    # a state from another device: the same layer run on the meta device
    _, meta_state = pk.causal_conv3d_act(x.to("meta"), w.to("meta"), padding_hw=1, impl="torch")
    _bad(lambda: pk.causal_conv3d_act(x, w, padding_hw=1, state=meta_state, impl=impl),
         ValueError, "state", "device")
    # an empty chunk is legal for the causal op: no output frames, state unchanged in length
    y, s2 = pk.causal_conv3d_act(x[:, :, :0], w, padding_hw=1, state=state, impl=impl)
    assert y.shape == (1, 8, 0, 5, 5) and s2.frames_seen == 3


@needs_cpp
def test_bad_input_direct_op_calls():
    """Direct torch.ops.pfp calls bypass the Python checks; the C++ checks name the argument."""
    x = torch.randn(1, 4, 3, 5, 5)
    w = torch.randn(8, 4, 3, 3, 3)
    op, cop, pop = torch.ops.pfp.conv3d_act, torch.ops.pfp.causal_conv3d_act, torch.ops.pfp.project_tokens
    _bad(lambda: op(x[0], w, None, [1, 1, 1], [0, 0, 0], "silu"), RuntimeError, "x must be 5-D")
    _bad(lambda: op(x, w[:, :2], None, [1, 1, 1], [0, 0, 0], "silu"), RuntimeError, "channels", "Cin=2")
    _bad(lambda: op(x, w, None, [1, 0, 1], [0, 0, 0], "silu"), RuntimeError, "stride", ">= 1")
    _bad(lambda: op(x, w, None, [1, 1, 1], [0, 0, 0], "tanh"), RuntimeError, "activation", "silu")
    _bad(lambda: op(x, w, torch.randn(3), [1, 1, 1], [0, 0, 0], "silu"), RuntimeError, "bias")
    _bad(lambda: op(x[:, :, :0], w, None, [1, 1, 1], [1, 0, 0], "silu"), RuntimeError, "empty time")
    _bad(lambda: cop(x, torch.randn(1, 4, 2, 5, 6), w, None, [1, 1, 1], [0, 0], "silu", 0, 1),
         RuntimeError, "prev must match x")
    _bad(lambda: cop(x, torch.randn(1, 4, 2, 5, 5).double(), w, None, [1, 1, 1], [0, 0], "silu", 0, 1),
         RuntimeError, "prev", "dtype")
    _bad(lambda: cop(x, None, w, None, [1, 1, 1], [0, 0], "silu", -2, 9), RuntimeError, "num_out=9")
    _bad(lambda: cop(x, None, w, None, [1, 1, 1], [0, 0], "silu", 0, -1), RuntimeError, "num_out")
    _bad(lambda: pop(x, torch.randn(6, 3), None, None), RuntimeError, "weight", "C=4")
    _bad(lambda: pop(x, torch.randn(6, 4), None, torch.randn(1, 7, 6)), RuntimeError, "residual")


# ----------------------------------------------------------------------------------------------
# the package without its C++ library, and `python -m pfp_kernels.info`
# ----------------------------------------------------------------------------------------------
def _run(code: str, env_extra=None, cwd=None, pythonpath=ROOT):
    env = dict(os.environ, PYTHONPATH=pythonpath, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=300)


FALLBACK_CHECK = """
    import warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import pfp_kernels as pk
        import importlib, pfp_kernels._extension
        import pfp_kernels  # importing again must not warn again
    import torch
    from pfp_kernels import _extension
    assert not _extension.LOADED
    x, w = torch.randn(1, 2, 3, 4, 4), torch.randn(3, 2, 3, 3, 3)
    y = pk.conv3d_act(x, w, padding=1)              # auto falls back to the reference
    ref = pk.conv3d_act(x, w, padding=1, impl="torch")
    assert torch.equal(y, ref)
    try:
        pk.conv3d_act(x, w, padding=1, impl="cpp")
    except RuntimeError as e:
        assert "impl='cpp'" in str(e) and "C++ library not loaded" in str(e), e
    else:
        raise AssertionError("impl='cpp' must fail without the library")
    print("WARNINGS", sum("C++ kernels unavailable" in str(c.message) for c in caught))
    print("REASON", _extension.REASON)
"""


def test_import_without_extension_disabled():
    out = _run(FALLBACK_CHECK, {"PFP_DISABLE_CPP": "1"})
    assert out.returncode == 0, out.stderr
    assert "WARNINGS 0" in out.stdout and "disabled by PFP_DISABLE_CPP" in out.stdout


def test_import_with_broken_extension_warns_once(tmp_path):
    # A copy of the package (wherever it is installed) whose _C is garbage: loading fails, import
    # works, one warning.
    pkg = tmp_path / "pfp_kernels"
    shutil.copytree(os.path.dirname(pk.__file__), pkg,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (pkg / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not a shared library")
    out = _run(FALLBACK_CHECK, cwd=str(tmp_path), pythonpath=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "WARNINGS 1" in out.stdout, out.stdout + out.stderr
    assert "loading" in out.stdout and "failed" in out.stdout


ISA_CHECK = """
    import torch, torch.nn.functional as F
    import pfp_kernels as pk
    from pfp_kernels import _extension
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((2, 5, 7, 9, 11), (6, 5, 3, 3, 3), (6,)))
    y = pk.conv3d_act(x, w, b, stride=(2, 1, 2), padding=1, impl="cpp")
    ref = F.silu(F.conv3d(x.double(), w.double(), b.double(), (2, 1, 2), 1))
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    q, k, v, ck, cv = (torch.randn(2, n, 3, 32, generator=g) for n in (13, 13, 13, 40, 40))
    o = pk.joint_attention(q, k, v, ck, cv, impl="cpp")
    ref = F.scaled_dot_product_attention(*(torch.cat(p, 1).transpose(1, 2).double() for p in ((q,), (ck, k), (cv, v))))
    torch.testing.assert_close(o.double(), ref.transpose(1, 2), rtol=1e-4, atol=1e-4)
    print("ISA", _extension.ISA, torch.ops.pfp.build_info())
"""


@needs_cpp
def test_every_built_cpu_variant_loads_and_matches_the_reference():
    # one build carries kernels for several ISAs and picks one at import; each must work, not only
    # the one this machine picks (PFP_CPU_ISA asks for a lower one)
    built = _extension.built_isas()
    assert "generic" in built, built
    from pfp_kernels._extension import _FROM_TORCH
    best = _FROM_TORCH.get(torch.backends.cpu.get_cpu_capability(), "generic")
    for isa in built[built.index(best) if best in built else 0:]:
        out = _run(ISA_CHECK, {"PFP_CPU_ISA": isa})
        assert out.returncode == 0, (isa, out.stderr)
        assert f"ISA {isa} {isa}" in out.stdout, (isa, out.stdout)
    out = _run(ISA_CHECK, {"PFP_CPU_ISA": " GENERIC "})   # as torch spells ISAs (AVX2), spaces around
    assert out.returncode == 0 and "ISA generic generic" in out.stdout, out.stderr
    out = _run("import pfp_kernels", {"PFP_CPU_ISA": "sse9"})
    assert "PFP_CPU_ISA must be one of avx512, avx2, generic" in out.stderr


def test_info_cli():
    out = subprocess.run([sys.executable, "-m", "pfp_kernels.info"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for op in ("conv3d_act", "causal_conv3d_act", "project_tokens"):
        assert op in text
    assert "[cpu]" in text and re.search(r"\n +torch +yes", text)
    if HAS_CPP:
        assert "C++ library: loaded" in text and re.search(r"\n +cpp +yes", text)
        assert "cpp routes with a context: float32 flash, bfloat16 " in text
    else:
        assert re.search(r"\n +cpp +no:", text)
