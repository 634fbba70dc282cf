"""Shared cases and checks for the conv ops, reused by every implementation's tests.

tests/test_conv.py runs these for impl="cpp" and impl="torch"; tests/test_conv_triton.py can
parametrize impl="triton" over the same functions (under TRITON_INTERPRET=1, fp32/fp16 only).

Everything is checked against the plain-PyTorch reference computed in float64.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Optional

import torch

import pfp_kernels as pk
from pfp_kernels import conv as C
from pfp_kernels.testing import assert_close

CL3 = torch.channels_last_3d
LAYOUTS = ("channels_last", "contiguous", "strided")

# Tolerances: pfp_kernels.testing (outputs are O(1): weights are scaled by 1/sqrt(fan_in)).


@dataclass
class ConvCase:
    batch: int
    cin: int
    cout: int
    size: tuple[int, int, int]      # T, H, W of x
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]   # causal: padding[0] unused (time is causal)
    bias: bool
    activation: Optional[str]
    layout: str = "channels_last"
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"B{self.batch} {self.cin}->{self.cout} x{self.size} k{self.kernel} s{self.stride} "
                f"p{self.padding} bias={self.bias} act={self.activation} {self.layout}")


def random_conv_case(rng: random.Random, causal: bool = False, max_size: int = 7) -> ConvCase:
    """A random small conv: odd sizes and size 1, kernel 1 or 3 per axis, stride 1-3, padding
    0..kernel (so padding larger than the kernel's reach appears too), random layout."""
    kernel = tuple(rng.choice((1, 3)) for _ in range(3))
    stride = tuple(rng.choice((1, 1, 2, 3)) for _ in range(3))
    padding = tuple(rng.randint(0, k) for k in kernel)
    size = []
    for axis in range(3):
        if axis == 0 and causal:
            size.append(rng.randint(1, max_size + 2))
            continue
        # input must cover the kernel after padding
        lo = max(1, kernel[axis] - 2 * padding[axis])
        size.append(rng.randint(lo, max(lo, max_size)))
    return ConvCase(batch=rng.choice((1, 1, 2)), cin=rng.choice((1, 3, 4, 8, 17)),
                    cout=rng.choice((1, 5, 16, 19, 33)), size=tuple(size), kernel=kernel,
                    stride=stride, padding=padding, bias=rng.random() < 0.7,
                    activation=rng.choice(("silu", "silu", None)), layout=rng.choice(LAYOUTS))


def make_activation(shape, dtype, layout: str, device="cpu", generator=None) -> torch.Tensor:
    """A [B, C, T, H, W] tensor in the requested layout: channels_last (dense channels-last-3d),
    contiguous (NCDHW), or strided (a non-contiguous view: every other W column of a wider tensor,
    channels-last underneath)."""
    if layout == "strided":
        b, c, t, h, w = shape
        base = torch.randn(b, c, t, h, 2 * w, dtype=torch.float64, generator=generator)
        x = base.to(dtype).to(device).contiguous(memory_format=CL3)[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL3)
        return x
    x = torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype).to(device)
    return x.contiguous(memory_format=CL3) if layout == "channels_last" else x.contiguous()


def make_params(case: ConvCase, dtype, device="cpu", generator=None):
    fan_in = case.cin * case.kernel[0] * case.kernel[1] * case.kernel[2]
    w = torch.randn(case.cout, case.cin, *case.kernel, dtype=torch.float64, generator=generator)
    w = (w / fan_in ** 0.5).to(dtype).to(device)
    b = None
    if case.bias:
        # the "strided" layout takes a strided bias too: every other element of a longer vector
        step = 2 if case.layout == "strided" else 1
        b = (0.5 * torch.randn(case.cout * step, dtype=torch.float64, generator=generator)).to(dtype).to(device)
        b = b[::step]
    return w, b


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, dtype, what: str = "") -> None:
    """out (any dtype) against a float64 reference, with the dtype's tolerance relative to the
    reference's largest magnitude. NaN anywhere (e.g. an unwritten poisoned element) fails."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert_close(out, ref64, dtype, what=what)


def assert_dense_channels_last(y: torch.Tensor, what: str = "") -> None:
    """The op contract: outputs are dense channels-last-3d with exactly a fresh tensor's strides
    (what the fake kernels promise)."""
    want = torch.empty(y.shape, dtype=y.dtype).contiguous(memory_format=CL3).stride()
    significant = [(s, w) for s, w, n in zip(y.stride(), want, y.shape) if n > 1]
    assert all(s == w for s, w in significant), f"{what}: strides {y.stride()} != {want}"


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty is NaN-filled (and the C++ kernels allocate with at::empty), so an output
    element a kernel forgets to write shows up as NaN."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


# ----------------------------------------------------------------------------------------------
# checks (each returns nothing and asserts)
# ----------------------------------------------------------------------------------------------
def check_conv3d_act(impl: str, dtype, case: ConvCase, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = make_activation((case.batch, case.cin, *case.size), dtype, case.layout, device, g)
    w, b = make_params(case, dtype, device, g)
    with poisoned_outputs():
        y = pk.conv3d_act(x, w, b, case.stride, case.padding, case.activation, impl=impl)
    act = C.shapes.check_activation(case.activation)
    ref = C.conv3d_act_reference(x.double().cpu(), w.double().cpu(), None if b is None else b.double().cpu(),
                                 list(case.stride), list(case.padding), act)
    assert_close_to_reference(y.cpu(), ref, dtype, f"conv3d_act[{impl}] {case}")
    assert_dense_channels_last(y, f"conv3d_act[{impl}] {case}")
    return y


def causal_reference(x64, w64, b64, case: ConvCase) -> torch.Tensor:
    """Whole-sequence causal conv in float64: zero-pad kt-1 frames in front, ordinary conv."""
    kt = case.kernel[0]
    xp = torch.cat([x64.new_zeros(*x64.shape[:2], kt - 1, *x64.shape[3:]), x64], 2)
    y = torch.nn.functional.conv3d(xp, w64, b64, case.stride, (0, case.padding[1], case.padding[2]))
    return torch.nn.functional.silu(y) if case.activation == "silu" else y


def random_chunk_plan(rng: random.Random, total: int, stride_t: int) -> list[int]:
    """Chunk lengths summing to total: 1-frame chunks, empty chunks, chunks that split a stride
    group, and longer ones."""
    plan, left = [], total
    while left > 0:
        n = rng.choice((0, 1, 1, 2, stride_t + 1, max(1, 2 * stride_t - 1), rng.randint(1, left)))
        n = min(n, left)
        plan.append(n)
        left -= n
    return plan


def check_causal_streaming(impl: str, dtype, case: ConvCase, plan: list[int], seed: int = 0,
                           device="cpu") -> None:
    """Whole-sequence call vs the fp64 reference, and the chunked stream vs the whole call."""
    g = torch.Generator().manual_seed(seed)
    total = sum(plan)
    x = make_activation((case.batch, case.cin, total, *case.size[1:]), dtype, case.layout, device, g)
    w, b = make_params(case, dtype, device, g)
    kt, st = case.kernel[0], case.stride[0]
    pad_hw = case.padding[1:]
    with poisoned_outputs():
        whole, whole_state = pk.causal_conv3d_act(x, w, b, case.stride, pad_hw, case.activation, impl=impl)
    ref = causal_reference(x.double().cpu(), w.double().cpu(), None if b is None else b.double().cpu(), case)
    what = f"causal_conv3d_act[{impl}] {case} plan={plan}"
    assert whole.shape[2] == -(-total // st), what
    assert_close_to_reference(whole.cpu(), ref, dtype, what)
    assert_dense_channels_last(whole, what)
    assert whole_state.frames_seen == total

    state, outs, seen = None, [], 0
    with poisoned_outputs():
        for n in plan:
            y, state = pk.causal_conv3d_act(x[:, :, seen:seen + n], w, b, case.stride, pad_hw,
                                            case.activation, state=state, impl=impl)
            seen += n
            # Each output frame appears as soon as its last input frame has arrived.
            assert y.shape[2] == -(-seen // st) - -(-(seen - n) // st), what
            assert_dense_channels_last(y, what)
            # The state holds only frames future outputs still need: at most kt-1.
            held = 0 if state.frames is None else state.frames.shape[2]
            assert held <= kt - 1, f"{what}: state holds {held} frames > kt-1={kt - 1}"
            assert state.frames_seen == seen
            outs.append(y)
    streamed = torch.cat(outs, 2)
    assert_close(streamed, whole, dtype, kind="stream", what=f"{what}: stream vs whole")


def check_project_tokens(impl: str, dtype, shape, cout: int, bias: bool, residual: bool, layout: str,
                         seed: int = 0, device="cpu", compare=None) -> None:
    """``compare(out, ref64, dtype, what)``: default :func:`assert_close_to_reference` (max-abs); the
    GPU tests pass their own, whose tolerance allows TF32 dots."""
    g = torch.Generator().manual_seed(seed)
    b_, c = shape[:2]
    h = make_activation(shape, dtype, layout, device, g)
    w = (torch.randn(cout, c, dtype=torch.float64, generator=g) / c ** 0.5).to(dtype).to(device)
    bb = None
    if bias:  # strided layout: a strided bias too
        step = 2 if layout == "strided" else 1
        bb = torch.randn(cout * step, dtype=torch.float64, generator=g).to(dtype).to(device)[::step]
    ntok = shape[2] * shape[3] * shape[4]
    r = torch.randn(b_, ntok, cout, dtype=torch.float64, generator=g).to(dtype).to(device) if residual else None
    with poisoned_outputs():
        y = pk.project_tokens(h, w, bb, r, impl=impl)
    ref = C.project_tokens_reference(h.double().cpu(), w.double().cpu(), None if bb is None else bb.double().cpu(),
                                     None if r is None else r.double().cpu())
    assert y.is_contiguous()
    (compare or assert_close_to_reference)(y.cpu(), ref, dtype, f"project_tokens[{impl}] {shape}->{cout} {layout}")


__all__ = ["ConvCase", "random_conv_case", "make_activation", "make_params", "assert_close_to_reference",
           "assert_dense_channels_last", "poisoned_outputs", "check_conv3d_act", "causal_reference",
           "random_chunk_plan", "check_causal_streaming", "check_project_tokens", "LAYOUTS"]
